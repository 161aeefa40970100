"""`kvconvert compress`."""

from __future__ import annotations

from kvconvert.cli import app
from kvconvert.cli.options import Group, command, flag
from kvconvert.cli.summary import emit, stage_table
from kvconvert.config import CompressRequest, HealRequest
from kvconvert.config.base import OUTPUT, TRAINING

OPTIONS = Group(CompressRequest, arguments=("model",), nested={"calibration": "", "refine": "refine"}, skip=("heal",))
EXTRA = (
    flag(
        None,
        "--heal-tokens",
        help="Then heal the output with N tokens (`kvconvert heal` defaults).",
        panel=TRAINING,
        kind=int,
        metavar="N",
    ),
    flag(False, "--json", help="Print a JSON summary (plan, verification, seconds by stage).", panel=OUTPUT),
)


@command(app, "compress", OPTIONS, extra=EXTRA)
def compress(req: CompressRequest, heal_tokens: int | None, json: bool) -> None:
    """Merge MODEL's KV heads down to --heads and write a stock checkpoint to --output."""
    from kvconvert.pipeline import run_compress
    from kvconvert.progress import RichProgress

    if heal_tokens is not None:
        req.heal = heal_in_place(req, heal_tokens)
    with RichProgress(enabled=not json) as progress:
        result = run_compress(req, progress)
    emit("compress", summary(result), json)
    if not json:
        report(result)


def heal_in_place(req: CompressRequest, tokens: int) -> HealRequest:
    """`--heal-tokens N`: heal the written output from MODEL, on the calibration text plus `self` samples."""
    cal = req.calibration
    return HealRequest(
        student=str(req.output),
        teacher=req.model,
        teacher_revision=req.revision,
        allow_pickle=req.allow_pickle,
        output=req.output,
        datasets=[cal.dataset] if cal.dataset == "self" else [cal.dataset, "self"],
        tokens=tokens,
        seq_len=min(cal.seq_len, 512),
        seed=cal.seed,
        text_field=cal.text_field,
        device=cal.device,
        dtype=cal.dtype,
        overwrite=True,
        max_shard_size=req.max_shard_size,
    )


def summary(result) -> dict:
    """The run as JSON-ready data: KV heads, mean retained energy, verification, healing, seconds by stage."""
    plan = result.plan
    heal = result.heal.record.heal.model_dump(mode="json") if result.heal else None
    return {
        "output": str(result.output),
        "num_key_value_heads": {"before": plan.num_kv_heads_before, "after": plan.num_kv_heads_after},
        "method": plan.method,
        "grouping": plan.grouping,
        "retained": {
            part: sum(lp.retained(part) for lp in plan.layers) / len(plan.layers) for part in ("key", "value")
        },
        "verify": {"ok": result.verify.ok, "max_abs_diff": result.verify.max_abs_diff} if result.verify else None,
        "heal": {k: heal[k] for k in ("tokens", "steps", "train", "final_loss")} if heal else None,
        "timings": result.timings,
        "seconds": sum(result.timings.values()),
    }


def report(result) -> None:
    from kvconvert.console import make_console

    s = summary(result)
    console = make_console()
    heads, retained = s["num_key_value_heads"], s["retained"]
    console.print(
        f"{heads['before']} -> {heads['after']} KV heads ({s['method']}, {s['grouping']}); "
        f"mean retained energy: keys {retained['key']:.3f}, values {retained['value']:.3f}"
    )
    if s["verify"]:
        console.print(f"verified: written output matches (max |Δlogit| {s['verify']['max_abs_diff']:.2e})")
    if s["heal"]:
        h = s["heal"]
        console.print(f"healed in place: {h['tokens']} tokens ({h['train']}), final KL {h['final_loss']:.4f}")
    stage_table(console, result.timings, total=True)
    console.print(f"wrote {result.output}")
