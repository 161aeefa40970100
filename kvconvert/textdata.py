"""Calibration and evaluation text: aliases, local files, Hub datasets or the model's own samples -> token windows."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import torch
import yaml

from kvconvert.errors import KVConvertError

SELF = "self"
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def aliases() -> dict[str, dict]:
    """Dataset aliases from calibration/sources.yaml (packaged copy, or the repository's in a checkout)."""
    packaged = resources.files("kvconvert") / "_calibration" / "sources.yaml"
    path = packaged if packaged.is_file() else Path(__file__).resolve().parents[1] / "calibration" / "sources.yaml"
    return yaml.safe_load(path.read_text())


def iter_texts(spec: str, text_field: str | None = None) -> Iterator[str]:
    """Documents of a dataset spec (alias, local file, or Hub id), in order."""
    import datasets

    path = Path(spec).expanduser()
    table = aliases()
    if path.suffix in LOCAL_FORMATS and path.is_file():
        kwargs = {"sample_by": "document"} if path.suffix == ".txt" else {}
        ds = datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train", **kwargs)
    elif spec in table:
        cfg = dict(table[spec])
        text_field = text_field or cfg.pop("field", "text")
        ds = _hub(cfg.pop("path"), **cfg)
    elif path.exists() or path.suffix in LOCAL_FORMATS:
        known = ", ".join(LOCAL_FORMATS)
        raise KVConvertError(f"dataset file {spec} not found or not one of {known}")
    else:
        ds = _hub(spec, split="train")
    field = text_field or _text_column(ds, spec)
    for row in ds:
        text = row.get(field)
        if isinstance(text, str) and text.strip():
            yield text


def _hub(path: str, **kwargs) -> Iterable[dict]:
    import datasets

    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KVConvertError(
            f"cannot load dataset {path} ({first}); offline, use a local text file or --dataset self"
        ) from exc


def _text_column(ds, spec: str) -> str:
    features = getattr(ds, "features", None) or {}
    if "text" in features:
        return "text"
    for name, feat in features.items():
        if getattr(feat, "dtype", None) == "string":
            return name
    raise KVConvertError(f"dataset {spec} has no text column; name it with --text-field")


def token_windows(tokenizer, texts: Iterable[str], n_samples: int, seq_len: int, spec: str) -> torch.Tensor:
    """n_samples consecutive windows of seq_len tokens from the concatenated documents (EOS between them).

    Each window starts with BOS when the tokenizer has one, as real prompts do.
    """
    bos = tokenizer.bos_token_id
    body = seq_len - (1 if bos is not None else 0)
    need = n_samples * body
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise KVConvertError(
            f"dataset {spec} has {len(stream)} tokens, {need} needed for {n_samples} x {seq_len}; "
            "lower --samples/--seq-len or use more text"
        )
    rows = torch.tensor(stream[:need], dtype=torch.long).reshape(n_samples, body)
    if bos is not None:
        rows = torch.cat([torch.full((n_samples, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


@torch.no_grad()
def sample_windows(
    model,
    tokenizer,
    n_samples: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    spans: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Windows of text sampled from the model itself (temperature 1, no EOS), starting at BOS.

    Batch b is sampled with its own seed drawn from `seed`, so any subset of batches (`spans`, as dealt to one of
    several processes) reproduces exactly the rows a single process would sample.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise KVConvertError("--dataset self needs a tokenizer with a BOS or EOS token; use a text dataset")
    device = next(model.parameters()).device
    all_spans = [(b, min(b + batch_size, n_samples)) for b in range(0, n_samples, batch_size)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seeds = {span: int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) for span in all_spans}
    out = []
    for span in all_spans if spans is None else spans:
        torch.manual_seed(seeds[span])
        ids = torch.full((span[1] - span[0], 1), start, dtype=torch.long, device=device)
        seqs = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=seq_len - 1,
            min_new_tokens=seq_len - 1,
            pad_token_id=tokenizer.eos_token_id,
        )
        out.append(seqs[:, :seq_len].cpu())
    return torch.cat(out)


def windows_digest(windows: torch.Tensor) -> str:
    """sha256 of the token windows: identifies exactly what was calibrated or evaluated on."""
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()
