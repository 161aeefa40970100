"""Calibration and evaluation text: aliases, local files, Hub datasets or the model's own samples -> token windows."""

from __future__ import annotations

import hashlib
import sys
import time
from array import array
from collections.abc import Iterable, Iterator
from contextlib import closing
from importlib import resources
from pathlib import Path

import torch
import yaml

from kvconvert.compat import cache_kwargs
from kvconvert.errors import KVConvertError, first_line
from kvconvert.io.digest import sha256_of
from kvconvert.progress import Progress, Silent
from kvconvert.tables import FORMATS as TABLE_FORMATS
from kvconvert.tables import checked_rows, local_table
from kvconvert.textfile import TextFile, file_tokens

SELF = "self"
LOCAL_FORMATS = {".txt": "text", **TABLE_FORMATS}


def aliases() -> dict[str, dict]:
    """Dataset aliases from calibration/sources.yaml (packaged copy, or the repository's in a checkout)."""
    packaged = resources.files("kvconvert") / "_calibration" / "sources.yaml"
    path = packaged if packaged.is_file() else Path(__file__).resolve().parents[1] / "calibration" / "sources.yaml"
    return yaml.safe_load(path.read_text())


def builtin_texts(name: str, part: int, parts: int = 2) -> Iterator[str]:
    """Built-in text generated at run time: `pydoc-topics` is the Python language reference that ships with the
    interpreter (`pydoc_data.topics`); its distinct texts, in topic order, are dealt round-robin into `parts`
    disjoint parts."""
    if name != "pydoc-topics":
        raise KVConvertError(f"unknown built-in text {name}; see calibration/sources.yaml")
    from pydoc_data.topics import topics

    unique = list(dict.fromkeys(topics[key] for key in sorted(topics)))  # some topics share one text
    yield from unique[part::parts]


def describe(spec: str) -> str:
    """What a dataset spec is, for model cards: the alias and its source, a Hub id, or a local file's sha256."""
    if spec == SELF:
        return "text sampled from the original model (`self`)"
    entry = aliases().get(spec)
    if entry and "builtin" in entry:
        version = ".".join(map(str, sys.version_info[:2]))
        half = "even" if entry.get("part", 0) == 0 else "odd"
        return f"`{spec}`: Python {version} language reference (pydoc_data.topics, {half} topics)"
    if entry:
        config = f" ({entry['name']})" if entry.get("name") else ""
        return f"`{spec}`: Hub dataset `{entry['path']}`{config}, {entry.get('split', 'train')} split"
    path = Path(spec).expanduser()
    if path.is_file():
        digest = sha256_of(path)
        return f"local text (sha256 `{digest[:16]}…`)"
    if "/" in spec and not path.exists():
        return f"Hub dataset `{spec}`"
    return f"local text `{path.name}` (not found when this card was written)"


def iter_documents(spec: str, text_field: str | None = None) -> Iterator[str | TextFile]:
    """Documents of a dataset spec (alias, local file, or Hub id), in order; a local `.txt` file is one document,
    a `TextFile` that `token_stream` tokenizes only as far as it needs."""
    path = Path(spec).expanduser()
    table = aliases()
    entry = table.get(spec) or {}
    if "builtin" in entry and not (path.suffix in LOCAL_FORMATS and path.is_file()):
        yield from builtin_texts(entry["builtin"], entry.get("part", 0), entry.get("parts", 2))
        return
    if path.suffix == ".txt" and path.is_file():  # one document, as datasets' text loader reads it (1-2 s less)
        doc = TextFile(path)
        if doc.has_text():
            yield doc
        return
    if path.suffix in LOCAL_FORMATS and path.is_file():
        ds = local_table(path)
        if ds is None:
            return
        field = _text_column(ds, spec, text_field)
        yield from _table_texts(checked_rows(ds, path), field)
        return
    if spec in table:
        cfg = dict(table[spec])
        alias_field = cfg.pop("field", "text")  # never passed on: `field` means something else to the json loader
        text_field = text_field or alias_field
        ds = _hub(cfg.pop("path"), **cfg)
    elif path.exists() or path.suffix in LOCAL_FORMATS:
        known = ", ".join(LOCAL_FORMATS)
        raise KVConvertError(f"dataset file {spec} not found or not one of {known}")
    else:
        ds = _hub(spec, split="train")
    yield from _table_texts(ds, _text_column(ds, spec, text_field))


def _table_texts(rows: Iterable[dict], field: str) -> Iterator[str]:
    for row in rows:
        text = row.get(field)
        if isinstance(text, str) and text.strip():
            yield text


def iter_texts(spec: str, text_field: str | None = None) -> Iterator[str]:
    """Documents of a dataset spec as strings (a local `.txt` file read whole)."""
    for doc in iter_documents(spec, text_field):
        yield doc.read() if isinstance(doc, TextFile) else doc


def _hub(path: str, **kwargs) -> Iterable[dict]:
    import datasets

    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as exc:
        raise KVConvertError(
            f"cannot load dataset {path} ({first_line(exc)}); offline, use a local text file or --dataset self"
        ) from exc


STRING_DTYPES = ("string", "large_string")
"""`datasets` Value dtypes of text (pyarrow writes `large_string` for pandas' strings: parquet, csv)."""


def _text_column(ds, spec: str, named: str | None = None) -> str:
    """The column to read: `named` (which must exist where the dataset lists its columns), else `text`, else the
    dataset's only string column."""
    features = getattr(ds, "features", None) or {}
    columns = ", ".join(features) or "none"
    if named:
        if features and named not in features:
            raise KVConvertError(f"dataset {spec} has no column {named!r} (columns: {columns})")
        return named
    if "text" in features:
        return "text"
    texts = [name for name, feat in features.items() if getattr(feat, "dtype", None) in STRING_DTYPES]
    if len(texts) == 1:
        return texts[0]
    if texts:
        several = ", ".join(texts)
        raise KVConvertError(f"dataset {spec} has several text columns ({several}); name one with --text-field")
    raise KVConvertError(f"dataset {spec} has no text column (columns: {columns}); name it with --text-field")


def token_stream(tokenizer, documents: Iterable[str | TextFile], need: int) -> torch.Tensor:
    """The first `need` tokens of the concatenated documents (EOS after each), fewer if the text runs out: 1-D int64.

    Tokenizing stops once `need` tokens are there; a `TextFile` is tokenized piece by piece, as if whole."""
    eos = tokenizer.eos_token_id
    stream = array("q")
    for doc in documents:
        with closing(_pieces(tokenizer, doc)) as pieces:
            for ids in pieces:
                stream.extend(ids)
                if len(stream) >= need:
                    return _tensor(stream[:need])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            return _tensor(stream[:need])
    return _tensor(stream)


def _pieces(tokenizer, doc: str | TextFile) -> Iterator[list[int]]:
    if isinstance(doc, TextFile):
        yield from file_tokens(tokenizer, doc)
    else:
        yield tokenizer(doc, add_special_tokens=False)["input_ids"]


def _tensor(stream: array) -> torch.Tensor:
    return torch.frombuffer(stream, dtype=torch.long).clone() if stream else torch.zeros(0, dtype=torch.long)


def with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """`rows` (n, body) with a BOS column in front when the tokenizer has one."""
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=torch.long), rows], dim=1)


def token_windows(tokenizer, texts: Iterable[str | TextFile], n_samples: int, seq_len: int, spec: str) -> torch.Tensor:
    """n_samples consecutive windows of seq_len tokens from the concatenated documents (EOS between them).

    Each window starts with BOS when the tokenizer has one, as real prompts do.
    """
    bos = tokenizer.bos_token_id
    body = seq_len - (1 if bos is not None else 0)
    need = n_samples * body
    stream = token_stream(tokenizer, texts, need)
    if len(stream) < need:
        raise KVConvertError(
            f"dataset {spec} has {len(stream)} tokens, {need} needed for {n_samples} x {seq_len}; "
            "lower --samples/--seq-len or use more text"
        )
    return with_bos(stream.reshape(n_samples, body), bos)


SLOW_SAMPLING_TOKENS = 4096
"""Above this many sampled tokens on CPU, warn with an estimate measured on the first batch."""


def _next_tokens(logits: torch.Tensor, banned: int | None) -> torch.Tensor:
    """Temperature-1 samples of the last position's logits (full distribution, no top-k/top-p; `banned` never)."""
    last = logits[:, -1].float()
    if banned is not None:
        last[:, banned] = -torch.inf
    return torch.multinomial(torch.softmax(last, dim=-1), 1)


@torch.no_grad()
def _sample_batch(model, start: int, eos: int | None, rows: int, seq_len: int, device, on_token) -> torch.Tensor:
    """`rows` sequences of `seq_len` tokens from BOS: one forward per position, reusing the KV cache."""
    from transformers import DynamicCache

    ids = torch.full((rows, 1), start, dtype=torch.long, device=device)
    cache = DynamicCache()
    out = [ids]
    for _ in range(seq_len - 1):
        logits = model(input_ids=out[-1], **cache_kwargs(cache), use_cache=True).logits
        out.append(_next_tokens(logits, eos))
        on_token(rows)
    return torch.cat(out, dim=1).cpu()


def sample_windows(
    model,
    tokenizer,
    n_samples: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    spans: list[tuple[int, int]] | None = None,
    progress: Progress | None = None,
    subject: str = "the model",
) -> torch.Tensor:
    """Windows of text sampled from the model itself (temperature 1, no EOS), starting at BOS.

    Batch b is sampled with its own seed drawn from `seed`, so any subset of batches (`spans`, as dealt to one of
    several processes) reproduces exactly the rows a single process would sample. Progress counts tokens; on CPU a
    long job is announced with an estimate measured on its first tokens.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise KVConvertError("--dataset self needs a tokenizer with a BOS or EOS token; use a text dataset")
    progress = progress or Silent()
    device = next(model.parameters()).device
    all_spans = [(b, min(b + batch_size, n_samples)) for b in range(0, n_samples, batch_size)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seeds = {span: int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) for span in all_spans}
    todo = all_spans if spans is None else spans
    total = sum(b - a for a, b in todo) * (seq_len - 1)
    advance = progress.task(f"sampling from {subject} (tokens)", total)
    clock = {"t0": time.perf_counter(), "done": 0, "warned": total <= SLOW_SAMPLING_TOKENS or device.type != "cpu"}

    def on_token(n: int) -> None:
        advance(n)
        clock["done"] += n
        elapsed = time.perf_counter() - clock["t0"]
        if not clock["warned"] and elapsed > 2.0:
            clock["warned"] = True
            rate = clock["done"] / elapsed
            progress.log(
                f"warning: --dataset self samples {total:,} tokens on CPU at about {rate:.0f} tokens/s: "
                f"about {_duration(total / rate)}; a text dataset (e.g. --dataset pydoc) or fewer --samples/--seq-len "
                "is much faster"
            )

    out = []
    for span in todo:
        torch.manual_seed(seeds[span])
        out.append(_sample_batch(model, start, tokenizer.eos_token_id, span[1] - span[0], seq_len, device, on_token))
    return torch.cat(out) if out else torch.zeros((0, seq_len), dtype=torch.long)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def windows_digest(windows: torch.Tensor) -> str:
    """sha256 of the token windows: identifies exactly what was calibrated or evaluated on."""
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()
