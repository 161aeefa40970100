"""`kvconvert eval`: one report for a model and an optional baseline on the same tokens."""

from __future__ import annotations

from kvconvert.evaluation.kvcache import kv_report
from kvconvert.evaluation.perplexity import eval_windows, perplexity
from kvconvert.evaluation.runtime import probe_in_child, probe_model, probes_in_process
from kvconvert.progress import Progress, Silent

SCHEMA = "kvconvert-eval/1"


def evaluate(
    model_spec: str,
    *,
    baseline: str | None = None,
    dataset: str = "self",
    samples: int = 32,
    seq_len: int = 512,
    batch_size: int = 1,
    seed: int = 1,
    text_field: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    contexts: list[int] | None = None,
    new_tokens: int = 32,
    repeats: int = 3,
    runtime_batch: int = 1,
    progress: Progress | None = None,
) -> dict:
    """Perplexity, KV-cache accounting and (for `contexts`) decode speed / peak memory of a model and baseline."""
    from kvconvert.checkpoint import resolve
    from kvconvert.modeling import load_model, load_tokenizer, resolve_device, resolve_dtype
    from kvconvert.textdata import windows_digest

    progress = progress or Silent()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    contexts = contexts or []
    specs = {"model": model_spec} | ({"baseline": baseline} if baseline else {})
    ckpts = {role: resolve(spec, progress=progress) for role, spec in specs.items()}
    tokenizer = load_tokenizer(ckpts["model"])
    if baseline:
        check_same_tokenizer(ckpts["model"], ckpts["baseline"], tokenizer)
    for message in beyond_trained_length(ckpts["model"].config, [seq_len, *(c + new_tokens for c in contexts)]):
        progress.log(message)
    report: dict = {
        "schema": SCHEMA,
        "dataset": dataset,
        **({"text_field": text_field} if text_field else {}),
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "device": str(dev),
        "dtype": str(dt).removeprefix("torch."),
        "contexts": contexts,
        "runtime_batch": runtime_batch,
    }
    windows = None
    for role in [r for r in ("baseline", "model") if r in ckpts]:  # the baseline first: `self` text comes from it
        subject = f"{role} {_short(specs[role])}"
        progress.log(f"eval: loading {subject}")
        model = load_model(ckpts[role], dev, dt)
        if windows is None:
            windows = eval_windows(
                model, tokenizer, dataset, samples, seq_len, seed, batch_size, progress, subject, text_field
            )
            report["tokens_sha256"] = windows_digest(windows)
        entry = {
            "path": specs[role],
            "num_key_value_heads": model.config.num_key_value_heads,
            "perplexity": perplexity(model, windows, batch_size, progress, subject),
            "kv_cache": kv_report(model, contexts),
        }
        in_process = probes_in_process(dev)
        if not in_process:
            del model  # the child loads its own copy
        advance = progress.task(f"decode speed of {subject} (contexts)", len(contexts)) if contexts else None
        runtime = []
        for context in contexts:
            if in_process:
                runtime.append(probe_model(model, context, new_tokens, repeats, runtime_batch))
            else:
                runtime.append(probe_in_child(specs[role], context, new_tokens, repeats, device, dtype, runtime_batch))
            advance()
        if in_process:
            del model
        entry["runtime"] = runtime
        report[role] = entry
    if baseline:
        report["comparison"] = compare(report["baseline"], report["model"])
    return report


def beyond_trained_length(config, lengths: list[int]) -> list[str]:
    """A warning for the longest sequence eval will run (a window, BOS included; a context with its new tokens) when
    it passes the model's `max_position_embeddings`: measured all the same, but past what the model was made for."""
    limit = getattr(config, "max_position_embeddings", None)
    longest = max(lengths)
    if not limit or longest <= limit:
        return []
    return [
        f"eval: warning: sequences of up to {longest:,} tokens, beyond the model's max_position_embeddings "
        f"({limit:,}); the numbers there describe extrapolation, not the model as made"
    ]


def check_same_tokenizer(model, base, tokenizer) -> None:
    """Refuse a baseline that reads other token ids than MODEL's tokenizer writes: its perplexity on the same
    windows would not be comparable (or fail on ids past its vocabulary)."""
    from kvconvert.errors import KVConvertError
    from kvconvert.modeling import load_tokenizer

    if base.has_tokenizer():
        other = load_tokenizer(base)
        same = other.get_vocab() == tokenizer.get_vocab() and (other.bos_token_id, other.eos_token_id) == (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
        )
    else:
        same = base.config.vocab_size == model.config.vocab_size
    if not same or len(tokenizer) > base.config.vocab_size:
        raise KVConvertError(
            f"baseline {base.spec} has another tokenizer than {model.spec} (vocabulary {base.config.vocab_size} vs "
            f"{model.config.vocab_size}); eval scores both on the same tokens, so compare models that share one"
        )


def _short(spec: str) -> str:
    """A model spec as it reads in a progress line: a path's last part (a cached GGUF conversion's file name),
    else the spec."""
    from pathlib import Path

    from kvconvert.sources import read_provenance

    origin = read_provenance(Path(spec)) if Path(spec).is_dir() else None
    return origin["gguf_file"] if origin else (Path(spec).name or spec)


def compare(base: dict, model: dict) -> dict:
    """Model vs baseline: KV, KV-head and perplexity ratios; per context, decode speedup and peak memory saved."""
    out = {
        "kv_bytes_ratio": model["kv_cache"]["bytes_per_token"] / base["kv_cache"]["bytes_per_token"],
        "kv_heads_ratio": model["num_key_value_heads"] / base["num_key_value_heads"],
        "perplexity_ratio": model["perplexity"] / base["perplexity"],
    }
    pairs = list(zip(base["runtime"], model["runtime"], strict=True))
    if pairs:
        out["decode_speedup_at_context"] = {
            str(b["context"]): m["decode_tokens_per_second"] / b["decode_tokens_per_second"] for b, m in pairs
        }
        out["peak_memory_saved_bytes_at_context"] = {
            str(b["context"]): b["peak_memory_bytes"] - m["peak_memory_bytes"] for b, m in pairs
        }
    return out
