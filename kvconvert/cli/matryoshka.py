"""`kvconvert matryoshka`."""

from __future__ import annotations

from kvconvert.cli import app
from kvconvert.cli.options import Group, command, flag
from kvconvert.cli.summary import emit
from kvconvert.config.base import OUTPUT
from kvconvert.config.matryoshka import MatryoshkaRunRequest

OPTIONS = Group(MatryoshkaRunRequest, arguments=("model",))


@command(app, "matryoshka", OPTIONS, extra=(flag(False, "--json", help="Print a JSON summary.", panel=OUTPUT),))
def matryoshka(req: MatryoshkaRunRequest, json: bool) -> None:
    """Train MatryoshkaKV projections (orthogonal per-head cuts of keys and values) and pick per-head rates."""
    from kvconvert.matryoshka.run import run_matryoshka
    from kvconvert.progress import RichProgress

    with RichProgress(enabled=not json) as progress:
        result = run_matryoshka(req, progress)
    s = result.section
    emit("matryoshka", {"output": str(result.output), "matryoshka": s}, json)
    if not json:
        kept, kl = s["kept_fraction"], s["heldout_kl"]
        print(f"kept {kept:.1%} of the KV cache (budget {req.budget:.1%}); held-out KL {kl:.4f}")
        print(f"wrote {result.output}")
