"""`kvconvert profile`: data-free retrieval-head profile (RazorAttention) of MODEL."""

from __future__ import annotations

from kvconvert.cli import app
from kvconvert.cli.options import Group, command, flag
from kvconvert.cli.summary import emit
from kvconvert.config.base import OUTPUT
from kvconvert.config.profile import ProfileRunRequest

OPTIONS = Group(ProfileRunRequest, arguments=("model",))


@command(app, "profile", OPTIONS, extra=(flag(False, "--json", help="Print a JSON summary.", panel=OUTPUT),))
def profile_command(req: ProfileRunRequest, json: bool) -> None:
    """Score every KV head on repeated random tokens (copy loss when windowed, or echo/induction attention);
    select the retrieval heads."""
    from kvconvert.progress import RichProgress
    from kvconvert.razor.run import run_profile

    with RichProgress(enabled=not json) as progress:
        result = run_profile(req, progress)
    n = sum(map(len, result["retrieval"]))
    total = len(result["retrieval"]) * result["num_kv_heads"]
    check = {k: result[k] for k in ("stability", "held_out_copy_loss") if k in result}
    emit("profile", {"output": str(req.output), "retrieval_heads": n, "kv_heads": total, **check}, json)
    if json:
        return
    if "stability" in result:
        s = result["stability"]
        note = f"selection Jaccard vs each seed: mean {s['jaccard_mean']:.3f}, min {s['jaccard_min']:.3f}"
    else:
        loss = result["held_out_copy_loss"]
        note = "held-out copy loss: " + ", ".join(f"{k} {v:.3f}" for k, v in loss.items())
    print(f"{n} of {total} KV heads are retrieval heads; {note}; wrote {req.output}")
