"""Model card (README.md) of a converted checkpoint."""

from __future__ import annotations

import yaml

TAGS = ["kvconvert", "gqa", "kv-cache-compression"]


def model_card(info: dict) -> str:
    """Markdown card with Hub front matter, from the conversion record written to kvconvert.json."""
    front = {"base_model": info.get("base_model") or info["source"], "library_name": "transformers", "tags": TAGS}
    if info.get("license"):
        front["license"] = info["license"]
    kv = info["num_key_value_heads"]
    name = info.get("name", "this model")
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {name}: {kv['after']} KV heads",
        "",
        f"Converted from `{info['source']}` by [kvconvert](https://github.com/kvconvert/kvconvert): "
        f"{kv['before']} → {kv['after']} KV heads per layer, so the KV cache takes "
        f"{kv['after']}/{kv['before']} of its former size. Shapes and code are stock "
        f"(`num_key_value_heads` is the only config change).",
        "",
        f"- method: `{info['method']}`, grouping: `{info['grouping']}`",
        f"- calibration: `{info['calibration'].get('dataset')}`, "
        f"{info['calibration'].get('samples')} x {info['calibration'].get('seq_len')} tokens",
    ]
    if "heal" in info:
        h = info["heal"]
        lines.append(f"- healed: {h['tokens']} tokens of distillation from `{h['teacher']}` (trained `{h['train']}`)")
    for key, label in (("perplexity", "perplexity"), ("kv_bytes_per_token", "KV bytes per token")):
        if key in info:
            lines.append(f"- {label}: {info[key]}")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        "```",
        "",
        "```bash",
        "vllm serve PATH_OR_REPO",
        "python convert_hf_to_gguf.py PATH --outfile model.gguf   # llama.cpp",
        "```",
        "",
    ]
    return "\n".join(lines)
