"""The model card (README.md) of a converted checkpoint, rendered from its record (kvconvert.json).

`compress` writes the record and the card; later stages (`eval`, `heal`, `push`) add a section to the record with
`update_record`, which rewrites both files. The card is a pure function of the record: no dates, no machine
details, so the same conversion gives the same bytes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from kvconvert.errors import KVConvertError
from kvconvert.io.staging import write_text

RECORD = "kvconvert.json"
CARD = "README.md"
TAGS = ["kvconvert", "gqa", "kv-cache-compression"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
LOCAL_REF = "path/to/this/folder"


def dump_record(record: dict) -> str:
    return json.dumps(record, indent=2) + "\n"


def load_record(directory: Path) -> dict:
    path = directory / RECORD
    if not path.is_file():
        raise KVConvertError(f"{directory} has no {RECORD}; point at a directory written by `kvconvert compress`")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise KVConvertError(f"{path} is not valid JSON ({exc}); re-run `kvconvert compress`") from exc


def update_record(directory: Path, **sections) -> dict:
    """Set `sections` (name -> value) in DIR/kvconvert.json and re-render DIR/README.md; each file is replaced
    atomically. Returns the new record."""
    record = load_record(directory) | sections
    write_text(directory / RECORD, dump_record(record))
    write_text(directory / CARD, model_card(record))
    return record


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


def record_evaluation(model: str, report: dict, baseline: str | None) -> Path | None:
    """Add an eval report to MODEL's record and card when MODEL is a kvconvert output directory; return it."""
    directory = Path(model).expanduser()
    if not (directory / RECORD).is_file():
        return None
    update_record(directory, evaluation=evaluation_section(report, baseline))
    return directory / CARD


def front_matter(info: dict) -> dict:
    """Hub metadata: base model (only a real Hub id), library, license carried from the base, tags, and the
    measured perplexity as a model-index entry (`huggingface_hub.EvalResult`)."""
    from huggingface_hub import EvalResult, ModelCardData

    base = info.get("base_model")
    licence = {key: info[key] for key in ("license_name", "license_link") if info.get(key)}
    ev = info.get("evaluation")
    results = None
    if ev:
        dataset = ev["dataset"]
        results = [
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset,
                dataset_name=(ev.get("data") or dataset).replace("`", ""),
                metric_type="perplexity",
                metric_value=round(ev["perplexity"]["after"], 4),
                metric_config=f"{ev['samples']}x{ev['seq_len']} tokens, {ev['dtype']}",
            )
        ]
    data = ModelCardData(
        base_model=base if isinstance(base, str) and HUB_ID.fullmatch(base) else None,
        library_name="transformers",
        license=info.get("license") or None,
        pipeline_tag="text-generation",
        tags=TAGS,
        model_name=(info.get("name") or "model") + "-kvconvert" if results else None,
        eval_results=results,
        **licence,
    )
    return data.to_dict()


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _kv_rows(info: dict) -> list[str]:
    kv = info["num_key_value_heads"]
    rows = [f"| KV heads per layer | {kv['before']} | {kv['after']} |"]
    cache = info.get("kv_cache")
    if cache:
        per, size = cache["bytes_per_token"], cache["dtype_bytes"]
        label = cache.get("dtype") or f"{8 * size}-bit"
        rows.append(f"| KV cache per token ({label}) | {per['before']:,} B | {per['after']:,} B |")
        ctx = cache.get("context_length")
        if ctx:
            before, after = _mib(per["before"] * ctx), _mib(per["after"] * ctx)
            rows.append(f"| KV cache at {ctx:,} tokens ({label}) | {before} | {after} |")
        if size != 2:  # what runtimes usually serve in
            half = {k: v * 2 // size for k, v in per.items()}
            rows.append(f"| KV cache per token (16-bit) | {half['before']:,} B | {half['after']:,} B |")
    ev = info.get("evaluation")
    if ev:
        ppl = ev["perplexity"]
        before = f"{ppl['before']:.2f}" if ppl.get("before") is not None else "not measured"
        rows.append(
            f"| perplexity on {ev.get('data') or '`' + ev['dataset'] + '`'} "
            f"({ev['samples']} × {ev['seq_len']} tokens, {ev['dtype']}) | {before} | {ppl['after']:.2f} |"
        )
    return rows


def _provenance(info: dict) -> list[str]:
    """Where the weights came from, when not from the base model's own checkpoint (a GGUF file)."""
    src = info.get("gguf_source")
    if not src:
        return []
    return [
        f"The original's weights here are `{src['gguf_file']}`, a {src.get('quantization') or 'GGUF'} GGUF file, "
        f'expanded to {src["dtype"]} ({src.get("dtype_from", "")}): this model and the "original" column derive '
        "from those weights, not from the base model's own checkpoint on the Hub.",
        "",
    ]


def _made_with(info: dict) -> list[str]:
    cal = info.get("calibration", {})
    lines = [
        f"- merge: `{info['method']}` method, `{info['grouping']}` head grouping",
        f"- calibration: {cal.get('data') or '`' + str(cal.get('dataset')) + '`'}, "
        f"{cal.get('samples')} × {cal.get('seq_len')} tokens, "
        f"seed {cal.get('seed')}, {cal.get('dtype')} (token windows sha256 `{str(cal.get('tokens_sha256'))[:16]}…`)",
    ]
    layers = info.get("layers") or []
    if layers:
        keys = sum(lp["key_energy_retained"] for lp in layers) / len(layers)
        values = sum(lp["value_energy_retained"] for lp in layers) / len(layers)
        lines.append(f"- energy retained by the merge (mean over layers): keys {keys:.3f}, values {values:.3f}")
    if "refine" in info:
        r = info["refine"]
        lines.append(f"- refined: {r.get('steps')} steps per layer on {r.get('samples')} windows ({r.get('inputs')})")
    if "heal" in info:
        h = info["heal"]
        lines.append(
            f"- healed: {h.get('tokens')} tokens of distillation from `{h.get('teacher')}` (trained `{h.get('train')}`)"
        )
    lines.append(f"- kvconvert {info.get('kvconvert_version')}; the full record is in `{RECORD}`")
    return lines


def _reproduce(info: dict) -> list[str]:
    if "recipe" in info:
        return ["```yaml", yaml.safe_dump(info["recipe"], sort_keys=False).strip(), "```"]
    cal = info.get("calibration", {})
    kv = info["num_key_value_heads"]
    cmd = (
        f"kvconvert compress {info['source']} --heads {kv['after']} --method {info['method']} "
        f"--grouping {info['grouping']} --dataset {cal.get('dataset')} --samples {cal.get('samples')} "
        f"--seq-len {cal.get('seq_len')} --seed {cal.get('seed')} --output OUT"
    )
    return ["```bash", cmd, "```"]


def _usage(info: dict) -> list[str]:
    repo = (info.get("hub") or {}).get("repo_id")
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


def source_label(info: dict) -> str:
    """`source`, or `base_model` (as `source`) where the source was a kvconvert alias or a file for it."""
    base, source = info.get("base_model"), info["source"]
    return f"`{base}` (as `{source}`)" if base and base != source else f"`{source}`"


def model_card(info: dict) -> str:
    """Markdown card with Hub front matter, from the conversion record written to kvconvert.json."""
    kv = info["num_key_value_heads"]
    name = info.get("name") or "this model"
    heads = f"{kv['after']} KV head{'s' if kv['after'] != 1 else ''}"
    lines = [
        "---",
        yaml.safe_dump(front_matter(info), sort_keys=False).strip(),
        "---",
        "",
        f"# {name} with {heads}",
        "",
        f"{source_label(info)} converted by kvconvert from "
        f"{kv['before']} to {kv['after']} KV heads per layer: the KV cache takes {kv['after']}/{kv['before']} of "
        "its former size. Query heads, shapes of every other tensor, and the code are unchanged.",
        "",
        "| | original | this model |",
        "|---|---|---|",
        *_kv_rows(info),
        "",
        *_provenance(info),
    ]
    if "evaluation" not in info:
        lines += ["Perplexity has not been measured yet (`kvconvert eval DIR --baseline ORIGINAL` adds it).", ""]
    lines += ["## How it was made", "", *_made_with(info), "", "Reproduce:", "", *_reproduce(info), "", *_usage(info)]
    return "\n".join(lines)
