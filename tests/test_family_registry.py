"""Every registered family: a tiny random model whose KV heads come in identical pairs converts to half the KV heads,
reloads with stock transformers and matches the original logits to fp32 round-off (QK-norm families too).

Parametrised over the registry, so a newly registered family is tested automatically (it needs a tiny config in
tests/tiny.py; a missing one fails here).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvconvert.calibrate import calibrate
from kvconvert.checkpoint import Checkpoint
from kvconvert.config import CalibrateConfig
from kvconvert.converted import Converted
from kvconvert.errors import KVConvertError
from kvconvert.expand import expand
from kvconvert.export import write_checkpoint
from kvconvert.families import FAMILIES, REFUSED, family_for
from kvconvert.pipeline import plan_compression
from tests.tiny import TINY_FAMILIES, make_random, tiny_config

RANDOM_TEXT = CalibrateConfig(dataset="random", samples=4, seq_len=24, batch_size=4)
"""What the given random windows stand for (recorded in the statistics' source)."""

CASES = [(f.name, kind) for f in FAMILIES for kind in ("mha", "gqa")]


def _logits(path, ids):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_identical_pairs_merge_exactly(tmp_path, family, kind):
    assert family in TINY_FAMILIES, f"registered family {family} has no tiny config in tests/tiny.py"
    heads, kv = (4, 2) if kind == "mha" else (4, 1)  # after the merge; the source has 2x the KV heads in pairs
    base = make_random(tmp_path / "base", family, heads=heads, kv_heads=kv)
    paired = expand(Checkpoint(base, "base"), tmp_path / "paired", n_new=2 * kv, seed=0)
    ckpt = Checkpoint(paired, "paired")
    assert ckpt.family.name == family and ckpt.family.geometry(ckpt.config).num_kv_heads == 2 * kv
    windows = torch.randint(3, 64, (4, 24), generator=torch.Generator().manual_seed(1))
    stats = calibrate(
        ckpt, tmp_path / "s.safetensors", RANDOM_TEXT, torch.device("cpu"), torch.float32, windows=windows
    )
    plan = plan_compression(ckpt, stats, kv, "weighted", "search", torch.device("cpu"))
    out = tmp_path / "out"
    write_checkpoint(Converted(ckpt, plan), out, extra_files={})
    ids = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    want, mid, got = _logits(base, ids), _logits(paired, ids), _logits(out, ids)
    scale = want.abs().max()
    assert (mid - want).abs().max() <= 1e-5 * scale, "expansion to identical pairs is not exact"
    assert (got - want).abs().max() <= 1e-5 * scale
    model = AutoModelForCausalLM.from_pretrained(out)
    assert ckpt.family.geometry(model.config).num_kv_heads == kv


@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_refused_families_say_why(arch):
    config = tiny_config("llama")
    config.architectures = [arch]
    with pytest.raises(KVConvertError, match=r"cannot be converted: .+"):
        family_for(config)


def test_falcon_old_architecture_is_refused_with_reason():
    config = tiny_config("falcon")
    config.new_decoder_architecture = False
    config.architectures = ["FalconForCausalLM"]
    with pytest.raises(KVConvertError, match="old decoder architecture"):
        family_for(config)
