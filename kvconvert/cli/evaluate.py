"""`kvconvert eval`."""

from __future__ import annotations

import sys

from kvconvert.cli import app
from kvconvert.cli.options import Group, command, flag
from kvconvert.cli.summary import emit
from kvconvert.config import EvalRequest
from kvconvert.config.base import OUTPUT

OPTIONS = Group(EvalRequest, arguments=("model",))
EXTRA = (
    flag(False, "--json", help="Print one JSON object (the report).", panel=OUTPUT),
    flag(
        True, "--card/--no-card", help="Record the perplexities in MODEL's kvconvert.json and model card.", panel=OUTPUT
    ),
)


@command(app, "eval", OPTIONS, extra=EXTRA)
def eval_command(req: EvalRequest, json: bool, card: bool) -> None:
    """Perplexity, KV-cache bytes and (with --contexts) decode speed and peak memory of MODEL vs --baseline."""
    from kvconvert.card import record_evaluation
    from kvconvert.progress import RichProgress
    from kvconvert.workflow import run_eval

    if req.cache:
        return _eval_cache(req, json)
    with RichProgress(enabled=not json) as progress:
        result = run_eval(req, progress)
    emit("eval", result, json)
    if not json:
        render(result)
    if card and (said := record_evaluation(req.model, result, req.baseline)):
        print(said, file=sys.stderr)


def _eval_cache(req, json: bool) -> None:
    """`--cache`: perplexity, passkey and decode speed through the runtime vs the full cache."""
    from kvconvert.progress import RichProgress
    from kvconvert.workflow import run_eval_cache

    with RichProgress(enabled=not json) as progress:
        report = run_eval_cache(req, progress)
    emit("eval", report, json)
    if not json:
        render_cache(report)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def render(result: dict) -> None:
    """The report as rich tables."""
    from rich.table import Table

    from kvconvert.console import make_console

    console = make_console()
    roles = [r for r in ("baseline", "model") if r in result]
    table = Table(title=f"{result['dataset']}: {result['samples']} x {result['seq_len']} tokens, {result['dtype']}")
    tokens = result[roles[0]]["kv_cache"]["measured_tokens"]
    for col in ("model", "KV heads", "perplexity", "KV bytes/token", f"DynamicCache, {tokens} tokens"):
        table.add_column(col)
    for role in roles:
        r = result[role]
        kv = r["kv_cache"]
        measured = "= computed" if kv["measured_matches"] else f"{kv['measured_bytes']} B ≠ {kv['computed_bytes']} B"
        table.add_row(
            r["path"], str(r["num_key_value_heads"]), f"{r['perplexity']:.3f}", str(kv["bytes_per_token"]), measured
        )
    console.print(table)
    if result["contexts"]:
        rt = Table(title=f"stock generate(), batch {result['runtime_batch']}, median of repeats after a warm-up")
        for col in (
            "model",
            "context",
            "KV cache MiB",
            "real cache",
            "prefill s",
            "decode tok/s",
            "peak MiB",
            "model MiB",
        ):
            rt.add_column(col)
        for role in roles:
            r = result[role]
            for p in r["runtime"]:
                rt.add_row(
                    r["path"],
                    str(p["context"]),
                    _mib(p["computed_cache_bytes"]),  # this run's: batch x (context + new tokens - 1)
                    "= computed" if p["cache_matches"] else f"{_mib(p['measured_cache_bytes'])} (differs)",
                    f"{p['prefill_seconds']:.2f}",
                    f"{p['decode_tokens_per_second']:.1f}",
                    _mib(p["peak_memory_bytes"]),
                    _mib(p["model_memory_bytes"]),
                )
        console.print(rt)
    if "comparison" in result:
        c = result["comparison"]
        console.print(f"KV cache x{c['kv_bytes_ratio']:.3f}, perplexity x{c['perplexity_ratio']:.3f}")


def render_cache(report: dict) -> None:
    """The `--cache` report as a rich table: one row per cache and context, bytes also as a share of the full."""
    from rich.table import Table

    from kvconvert.console import make_console

    console = make_console()
    prompt = f", first {report['prompt_tokens']} tokens as the prompt" if report["prompt_tokens"] else ""
    table = Table(title=f"{report['cache']} vs the full cache (perplexity{prompt})")
    for col in ("cache", "perplexity", "context", "passkey", "passkey after", "decode tok/s", "cache MiB", "vs full"):
        table.add_column(col)
    full = report["methods"]["full"]["contexts"]
    for name, entry in report["methods"].items():
        rows = entry["contexts"].items() or [("-", None)]
        for ctx, p in rows:
            cells = (
                ["-"] * 5
                if p is None
                else [
                    ctx,
                    f"{p['passkey_accuracy']:.2f}",
                    f"{p['passkey_after_accuracy']:.2f}",
                    f"{p['decode_tokens_per_second']:.1f}",
                    _mib(p["cache_bytes"]),
                ]
            )
            share = "-" if p is None else f"{p['cache_bytes'] / full[ctx]['cache_bytes']:.1%}"
            table.add_row(name, f"{entry['perplexity']:.3f}", *cells, share)
    console.print(table)
