"""`kvconvert eval`."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from kvconvert.card import record_evaluation
from kvconvert.cli import app, options
from kvconvert.evaluation import evaluate
from kvconvert.progress import RichProgress


def _contexts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter("a comma-separated list of token counts, e.g. 512,2048,8192") from None
    if any(v < 1 for v in values):
        raise typer.BadParameter("context lengths must be positive")
    return values


@app.command("eval")
def eval_command(
    model: str = options.Model,
    baseline: str = typer.Option(None, "--baseline", help="Compare with this model on the same tokens."),
    dataset: str = options.Dataset,
    samples: int = typer.Option(32, "--samples", min=1, help="Number of token windows."),
    seq_len: int = typer.Option(512, "--seq-len", min=2, help="Tokens per window."),
    batch_size: int = options.BatchSize,
    device: str = options.Device,
    dtype: str = options.Dtype,
    seed: int = typer.Option(1, "--seed", help="Seed for `--dataset self` (differs from calibration's 0)."),
    contexts: str = typer.Option(
        "", "--contexts", help="Also measure decode tokens/s and peak memory at these context lengths (512,2048)."
    ),
    new_tokens: int = typer.Option(32, "--new-tokens", min=2, help="Tokens generated per runtime measurement."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runtime repeats (median, after one warm-up)."),
    runtime_batch: int = typer.Option(1, "--runtime-batch", min=1, help="Sequences per runtime measurement."),
    cache: str = typer.Option(
        None, "--cache", help="Evaluate through a cache runtime, e.g. razor[:PROFILE] (vs the full cache)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    card: bool = typer.Option(
        True, "--card/--no-card", help="Record the perplexities in MODEL's kvconvert.json and model card."
    ),
) -> None:
    """Perplexity, KV-cache bytes and (with --contexts) decode speed and peak memory of MODEL vs --baseline."""
    if cache:
        return _eval_cache(
            model, cache, dataset, samples, seq_len, seed, device, dtype, _contexts(contexts), new_tokens
        )
    kwargs = dict(baseline=baseline, dataset=dataset, samples=samples, seq_len=seq_len, batch_size=batch_size)
    kwargs |= dict(seed=seed, device=device, dtype=dtype, contexts=_contexts(contexts))
    kwargs |= dict(new_tokens=new_tokens, repeats=repeats, runtime_batch=runtime_batch)
    if as_json:
        result = evaluate(model, **kwargs)
        print(json.dumps(result, indent=2))
    else:
        with RichProgress() as progress:
            result = evaluate(model, progress=progress, **kwargs)
        render(result)
    if card and (path := record_evaluation(model, result, baseline)):
        print(f"recorded in {path}", file=sys.stderr)


def _eval_cache(model, spec, dataset, samples, seq_len, seed, device, dtype, contexts, new_tokens) -> None:
    """`--cache`: perplexity, passkey and decode speed through the runtime vs the full cache, as JSON."""
    from kvconvert.checkpoint import resolve
    from kvconvert.evaluation.cached import evaluate_cache
    from kvconvert.evaluation.perplexity import eval_windows
    from kvconvert.modeling import load_model, load_tokenizer, resolve_device, resolve_dtype

    ckpt, dev = resolve(model), resolve_device(device)
    lm, tok = load_model(ckpt, dev, resolve_dtype(dtype, dev)), load_tokenizer(ckpt)
    windows = eval_windows(lm, tok, dataset, samples, seq_len, seed, 1)
    print(json.dumps(evaluate_cache(lm, tok, spec, windows, contexts, new_tokens=new_tokens), indent=2))


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def render(result: dict) -> None:
    """The report as rich tables."""
    console = Console()
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
                    _mib(r["kv_cache"]["bytes_at_context"][str(p["context"])]),
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
