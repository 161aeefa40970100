"""The model card (README.md) of a converted checkpoint, rendered from its record (kvconvert.json).

`compress` writes the record and the card; later stages (`eval`, `heal`, `push`) add a section to the record with
`update_record`, which rewrites both files. The card is a pure function of the record: no dates, no machine
details, so the same conversion gives the same bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from kvconvert.io.staging import write_text
from kvconvert.record import RECORD, Calibration, Record, dump_record, load_record, new_record

CARD = "README.md"
TAGS = ["kvconvert", "gqa", "kv-cache-compression"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
LOCAL_REF = "path/to/this/folder"


@dataclass(frozen=True)
class Updated:
    """What `update_record` wrote: the new record, and whether README.md was re-rendered (False: it was edited
    by hand, or there is no card for this kind of record, and it was left as it was)."""

    record: Record
    card: bool


def update_record(directory: Path, **sections) -> Updated:
    """Set `sections` in DIR/kvconvert.json and re-render DIR/README.md, each replaced atomically. A README.md
    that is not kvconvert's rendering of the old record (edited by hand) is never replaced."""
    old = load_record(directory)
    record = old.with_sections(**sections)
    write_text(directory / RECORD, dump_record(record))
    ours = card_is_ours(directory, old)
    if ours:
        write_text(directory / CARD, model_card(record))
    return Updated(record, ours)


def card_is_ours(directory: Path, record: Record) -> bool:
    """Whether kvconvert may (re)write DIR/README.md: a conversion's record, and the card is absent or still
    kvconvert's rendering of `record` (not edited by hand)."""
    path = directory / CARD
    return record.is_conversion and (not path.exists() or path.read_text() == model_card(record))


def add_section(directory: Path, **sections) -> Updated:
    """`update_record` where DIR has a record; otherwise a new record holding only `sections` (no card)."""
    if (directory / RECORD).is_file():
        return update_record(directory, **sections)
    record = new_record(**sections)
    write_text(directory / RECORD, dump_record(record))
    return Updated(record, False)


def evaluation_section(report: dict, baseline: str | None) -> dict:
    """What the card keeps of a `kvconvert eval` report (with `baseline`, the original, when it was compared)."""
    from kvconvert.textdata import describe

    model, base = report["model"], report.get("baseline")
    return {
        "dataset": report["dataset"],
        "samples": report["samples"],
        "seq_len": report["seq_len"],
        "seed": report["seed"],
        "dtype": report["dtype"],
        "data": describe(report["dataset"]),
        "tokens_sha256": report["tokens_sha256"],
        "baseline": baseline if base else None,
        "perplexity": {"before": base["perplexity"] if base else None, "after": model["perplexity"]},
    }


def record_evaluation(model: str, report: dict, baseline: str | None) -> str | None:
    """Add an eval report to MODEL's record and card when MODEL is a kvconvert output directory; say where."""
    directory = Path(model).expanduser()
    if not (directory / RECORD).is_file():
        return None
    section = evaluation_section(report, baseline)
    old = load_record(directory).evaluation
    same_tokens = old is not None and (old.tokens_sha256, old.dtype) == (section["tokens_sha256"], section["dtype"])
    if section["perplexity"]["before"] is None and same_tokens and old.perplexity.before is not None:
        # no --baseline this time: the original's perplexity on these very tokens still holds
        section |= {"baseline": old.baseline, "perplexity": section["perplexity"] | {"before": old.perplexity.before}}
    updated = update_record(directory, evaluation=section)
    if updated.card:
        return f"recorded in {directory / RECORD} and {directory / CARD}"
    if not updated.record.is_conversion:
        return f"recorded in {directory / RECORD}"
    return f"recorded in {directory / RECORD}; {directory / CARD} was edited by hand, so it was left as it is"


def front_matter(info: Record) -> dict:
    """Hub metadata: base model (only a real Hub id), library, license carried from the base, tags, and the
    measured perplexity as a model-index entry (`huggingface_hub.EvalResult`)."""
    from huggingface_hub import EvalResult, ModelCardData

    extra = info.model_extra or {}
    licence = {key: extra[key] for key in ("license_name", "license_link") if extra.get(key)}
    ev = info.evaluation
    results = None
    if ev:
        results = [
            EvalResult(
                task_type="text-generation",
                dataset_type=ev.dataset,
                dataset_name=(ev.data or ev.dataset).replace("`", ""),
                metric_type="perplexity",
                metric_value=round(ev.perplexity.after, 4),
                metric_config=f"{ev.samples}x{ev.seq_len} tokens, {ev.dtype}",
            )
        ]
    base = info.base_model
    data = ModelCardData(
        base_model=base if base and HUB_ID.fullmatch(base) else None,
        library_name="transformers",
        license=info.license or None,
        pipeline_tag="text-generation",
        tags=TAGS,
        model_name=(info.name or "model") + "-kvconvert" if results else None,
        eval_results=results,
        **licence,
    )
    return data.to_dict()


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _kv_rows(info: Record) -> list[str]:
    kv = info.num_key_value_heads
    rows = [f"| KV heads per layer | {kv.before} | {kv.after} |"]
    cache = info.kv_cache
    if cache:
        per, size = cache.bytes_per_token, cache.dtype_bytes
        label = cache.dtype or f"{8 * size}-bit"
        rows.append(f"| KV cache per token ({label}) | {per.before:,} B | {per.after:,} B |")
        if ctx := cache.context_length:
            at = cache.bytes_at_context  # sliding windows counted (records before it: every layer keeps every token)
            before, after = (at.before, at.after) if at else (per.before * ctx, per.after * ctx)
            before, after = _mib(before), _mib(after)
            rows.append(f"| KV cache at {ctx:,} tokens ({label}) | {before} | {after} |")
        if size != 2:  # what runtimes usually serve in
            before, after = per.before * 2 // size, per.after * 2 // size
            rows.append(f"| KV cache per token (16-bit) | {before:,} B | {after:,} B |")
    if ev := info.evaluation:
        ppl = ev.perplexity
        before = f"{ppl.before:.2f}" if ppl.before is not None else "not measured"
        rows.append(
            f"| perplexity on {ev.data or '`' + ev.dataset + '`'} "
            f"({ev.samples} × {ev.seq_len} tokens, {ev.dtype}) | {before} | {ppl.after:.2f} |"
        )
    return rows


def _provenance(info: Record) -> list[str]:
    """Where the weights came from, when not from the base model's own checkpoint (a GGUF file)."""
    src = info.gguf_source
    if not src:
        return []
    return [
        f"The original's weights here are `{src['gguf_file']}`, a {src.get('quantization') or 'GGUF'} GGUF file, "
        f'expanded to {src["dtype"]} ({src.get("dtype_from", "")}): this model and the "original" column derive '
        "from those weights, not from the base model's own checkpoint on the Hub.",
        "",
    ]


def _made_with(info: Record) -> list[str]:
    cal = info.calibration or Calibration()
    lines = [
        f"- merge: `{info.method}` method, `{info.grouping}` head grouping",
        f"- calibration: {cal.data or '`' + str(cal.dataset) + '`'}, "
        f"{cal.samples} × {cal.seq_len} tokens, "
        f"seed {cal.seed}, {cal.dtype} (token windows sha256 `{str(cal.tokens_sha256)[:16]}…`)",
    ]
    if layers := info.layers:
        keys = sum(lp.key_energy_retained for lp in layers) / len(layers)
        values = sum(lp.value_energy_retained for lp in layers) / len(layers)
        lines.append(f"- energy retained by the merge (mean over layers): keys {keys:.3f}, values {values:.3f}")
    if r := info.refine:
        lines.append(f"- refined: {r.steps} steps per layer on {r.samples} windows ({r.inputs})")
    if h := info.heal:
        lines.append(f"- healed: {h.tokens} tokens of distillation from `{h.teacher}` (trained `{h.train}`)")
    lines.append(f"- kvconvert {info.kvconvert_version}; the full record is in `{RECORD}`")
    return lines


def _reproduce(info: Record) -> list[str]:
    if info.recipe is not None:
        return ["```yaml", yaml.safe_dump(info.recipe, sort_keys=False).strip(), "```"]
    cal = info.calibration or Calibration()
    cmd = (
        f"kvconvert compress {info.source} --heads {info.num_key_value_heads.after} --method {info.method} "
        f"--grouping {info.grouping} --dataset {cal.dataset} --samples {cal.samples} "
        f"--seq-len {cal.seq_len} --seed {cal.seed}"
    )
    if text_field := (cal.model_extra or {}).get("text_field"):
        cmd += f" --text-field {text_field}"
    if batch_size := (cal.model_extra or {}).get("batch_size"):  # recorded for `self`: its samples depend on it
        cmd += f" --batch-size {batch_size}"
    if r := info.refine:  # the refinement changed the weights: without it the command makes another model
        cmd += f" --refine-steps {r.steps} --refine-lr {r.lr}"
        cmd += f" --refine-samples {r.samples}" if r.samples is not None else ""
        cmd += f" --refine-inputs {r.inputs}" if r.inputs else ""
    return ["```bash", cmd + " --output OUT", "```"]


def _usage(info: Record) -> list[str]:
    repo = info.hub.repo_id if info.hub else None
    ref = repo or LOCAL_REF
    local = f"./{repo.split('/')[-1]}" if repo else LOCAL_REF
    gguf = f"{(repo or 'model').split('/')[-1]}.gguf"
    lines = [
        "## Usage",
        "",
        "Stock runtimes load it unchanged; only `num_key_value_heads` differs from the original config.",
        "",
        "transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model_id = "{ref}"',
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")',
        'inputs = tokenizer("The KV cache", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
        "```",
        "",
        "vLLM:",
        "",
        "```bash",
        f"vllm serve {ref}",
        "```",
        "",
        "llama.cpp (convert with its own `convert_hf_to_gguf.py`, then run):",
        "",
        "```bash",
    ]
    if repo:
        lines.append(f"hf download {repo} --local-dir {local}")
    lines += [
        f"python convert_hf_to_gguf.py {local} --outfile {gguf}",
        f'llama-cli -m {gguf} -p "The KV cache"',
        "```",
        "",
    ]
    return lines


def source_label(info: Record) -> str:
    """`source`, or `base_model` (as `source`) where the source was a kvconvert alias or a file for it."""
    base, source = info.base_model, info.source
    return f"`{base}` (as `{source}`)" if base and base != source else f"`{source}`"


def model_card(info: Record) -> str:
    """Markdown card with Hub front matter, from the conversion record written to kvconvert.json."""
    kv = info.num_key_value_heads
    name = info.name or "this model"
    heads = f"{kv.after} KV head{'s' if kv.after != 1 else ''}"
    lines = [
        "---",
        yaml.safe_dump(front_matter(info), sort_keys=False).strip(),
        "---",
        "",
        f"# {name} with {heads}",
        "",
        f"{source_label(info)} converted by kvconvert from "
        f"{kv.before} to {kv.after} KV heads per layer: the KV cache takes {kv.after}/{kv.before} of "
        "its former size. Query heads, shapes of every other tensor, and the code are unchanged.",
        "",
        "| | original | this model |",
        "|---|---|---|",
        *_kv_rows(info),
        "",
        *_provenance(info),
    ]
    if info.evaluation is None:
        lines += ["Perplexity has not been measured yet (`kvconvert eval DIR --baseline ORIGINAL` adds it).", ""]
    lines += ["## How it was made", "", *_made_with(info), "", "Reproduce:", "", *_reproduce(info), "", *_usage(info)]
    return "\n".join(lines)
