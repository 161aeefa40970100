"""`kvconvert eval` and `kvconvert push` used as a user would: a baseline with another tokenizer, the runtime table's
cache column, options eval --cache would ignore, and the card push writes where README.md was deleted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fakehub import FakeHub, Repo
from tests.test_push import TOKEN, push_cli
from tests.tiny import synthetic_text


def eval_cli(model, text, *args: str, samples: int = 1, seq_len: int = 16) -> subprocess.CompletedProcess:
    """`kvconvert eval MODEL --dataset TEXT` on a few short windows, plus `args`."""
    data = ["--dataset", str(text), "--samples", str(samples), "--seq-len", str(seq_len)]
    cmd = [sys.executable, "-m", "kvconvert", "--threads", "1", "eval", str(model), *args, *data]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory) -> Path:
    """A tiny Llama with its own tokenizer (another BPE, 400 tokens): not comparable with tiny_llama's 320."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("vocab") / "other"
    d.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(synthetic_text(200, 5), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(d)
    config = transformers.LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(d)
    return d


@pytest.mark.parametrize("order", ["bigger_baseline", "smaller_baseline"])
def test_a_baseline_with_another_tokenizer_is_refused(tiny_llama, other_vocab, text_b, order):
    """Perplexities of models with different vocabularies are not comparable (the baseline would be scored on
    token ids of MODEL's tokenizer): eval scored the bigger one silently and crashed (IndexError) on the smaller."""
    model, baseline = (tiny_llama, other_vocab) if order == "bigger_baseline" else (other_vocab, tiny_llama)
    r = eval_cli(model, text_b, "--baseline", str(baseline), "--no-card", samples=2)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("kvconvert: error: ") and "tokenizer" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr


def test_push_without_a_local_card_lists_and_guards_the_card_it_writes(tiny_llama_2kv, tmp_path):
    """With README.md deleted locally, push renders a fresh card and uploads it: --dry-run must list it, and a
    README.md on the Hub that kvconvert did not upload must not be replaced without --overwrite."""
    directory = tmp_path / "no-card"
    shutil.copytree(tiny_llama_2kv, directory)
    (directory / "README.md").unlink()
    dry = push_cli(None, str(directory), "tester/theirs", "--dry-run", "--json", home=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "README.md" in [f["path"] for f in json.loads(dry.stdout)["files"]]
    theirs = {"README.md": b"# their own card\n"}
    with FakeHub(token=TOKEN) as hub:
        hub.repos["tester/theirs"] = Repo(private=False, branches={"main": dict(theirs)})
        r = push_cli(hub, str(directory), "tester/theirs", home=tmp_path)
        after = dict(hub.files("tester/theirs"))
    assert r.returncode == 2 and "README.md" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert after == theirs


def test_the_runtime_table_shows_the_cache_of_the_run_it_measured(tiny_llama, text_b, capsys):
    """With --runtime-batch 4 the runtime table's 'KV cache MiB' showed one sequence's cache at the context (0.5
    MiB) next to 'real cache: = computed', while the cache generate() really held (and the JSON's
    computed_cache_bytes) was 4 sequences of context + new_tokens - 1 tokens (2.0 MiB)."""
    from kvconvert.cli.evaluate import render
    from kvconvert.evaluation import evaluate

    report = evaluate(
        str(tiny_llama),
        dataset=str(text_b),
        samples=1,
        seq_len=8,
        device="cpu",
        contexts=[500],
        new_tokens=2,
        repeats=1,
        runtime_batch=4,
    )
    p = report["model"]["runtime"][0]
    assert p["cache_matches"] and p["computed_cache_bytes"] == 1024 * 501 * 4
    capsys.readouterr()
    render(report)
    row = next(line for line in capsys.readouterr().out.splitlines() if "│ 500 " in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[2] == f"{p['computed_cache_bytes'] / 2**20:.1f}", row


@pytest.fixture(scope="module")
def razor_profile(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("profile") / "profile.json"
    cmd = [sys.executable, "-m", "kvconvert", "--threads", "1", "profile", str(tiny_llama), "--output", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return out


@pytest.mark.parametrize("extra", [["--baseline", "BASE"], ["--runtime-batch", "4"]])
def test_eval_cache_refuses_the_options_it_would_ignore(tiny_llama, razor_profile, text_b, extra):
    """`eval --cache` compares MODEL with its own full cache, one sequence at a time: --baseline (another model) and
    --runtime-batch were accepted and silently ignored, so the table looked like a comparison it was not."""
    extra = [str(tiny_llama) if a == "BASE" else a for a in extra]
    r = eval_cli(tiny_llama, text_b, "--cache", f"razor:{razor_profile}", *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvconvert: error: ") and extra[0] in lines[0], r.stderr
