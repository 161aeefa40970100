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
    """Score every KV head for echo and induction on repeated random tokens; select the retrieval heads."""
    from kvconvert.razor.run import run_profile

    result = run_profile(req)
    s = result["stability"]
    n = sum(map(len, result["retrieval"]))
    total = len(result["retrieval"]) * result["num_kv_heads"]
    emit("profile", {"output": str(req.output), "retrieval_heads": n, "kv_heads": total, "stability": s}, json)
    if not json:
        print(
            f"{n} of {total} KV heads are retrieval heads; selection Jaccard vs each seed: "
            f"mean {s['jaccard_mean']:.3f}, min {s['jaccard_min']:.3f}; wrote {req.output}"
        )
