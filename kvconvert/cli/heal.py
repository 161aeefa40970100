"""`kvconvert heal`."""

from __future__ import annotations

from kvconvert.cli import app
from kvconvert.cli.options import Group, command, flag
from kvconvert.cli.summary import emit
from kvconvert.config import HealRequest
from kvconvert.config.base import OUTPUT

OPTIONS = Group(HealRequest, arguments=("student",))


@command(app, "heal", OPTIONS, extra=(flag(False, "--json", help="Print a JSON summary.", panel=OUTPUT),))
def heal(req: HealRequest, json: bool) -> None:
    """Distil STUDENT from --teacher (KL on next-token distributions) and write a stock checkpoint to --output."""
    from kvconvert.distributed import end_process_group
    from kvconvert.heal import run_heal
    from kvconvert.progress import RichProgress

    try:
        with RichProgress(enabled=not json) as progress:
            result = run_heal(req, progress)
    finally:
        end_process_group()  # under `accelerate launch`: gloo aborts a process that exits with its group alive
    if result is not None:
        h = result.record.heal.model_dump(mode="json")
        verify = {"ok": result.verify.ok, "max_abs_diff": result.verify.max_abs_diff} if result.verify else None
        emit("heal", {"output": str(result.output), "heal": h, "verify": verify, "seconds": result.seconds}, json)
        if not json:
            report(result)


def report(result) -> None:
    from kvconvert.console import make_console

    h = result.record.heal
    console = make_console()
    console.print(
        f"healed {h.tokens} tokens in {h.steps} steps ({h.train}, {h.processes} process(es)); "
        f"final loss {h.final_loss:.4f}; {result.seconds:.0f}s"
    )
    if result.verify:
        console.print(f"verified: stock reload matches (max |Δlogit| {result.verify.max_abs_diff:.2e})")
    console.print(f"wrote {result.output}")
