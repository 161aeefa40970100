"""Stages beyond the merge on families whose layout differs: refinement, heal's attention selection, KV bytes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvconvert.calibrate import calibrate
from kvconvert.checkpoint import Checkpoint
from kvconvert.config import CalibrateConfig
from kvconvert.converted import Converted
from kvconvert.evaluation.kvcache import kv_report
from kvconvert.export import write_checkpoint
from kvconvert.heal.trainable import select_trainable
from kvconvert.pipeline import plan_compression
from kvconvert.refine import RefineOptions, refine
from tests.tiny import make_random

RANDOM_TEXT = CalibrateConfig(dataset="random", samples=4, seq_len=24, batch_size=4)
"""What the given random windows stand for (recorded in the statistics' source)."""

CPU = torch.device("cpu")


@pytest.mark.parametrize("family", ["gemma3", "phi3", "falcon", "cohere", "olmo2", "mixtral"])
def test_refine_heal_and_cache_bytes(tmp_path, family):
    """Distinct KV heads merged 2 -> 1 (lossy): refinement lowers each layer's error, the refined checkpoint reloads
    stock, heal trains exactly the attention projections, and the cache measured after a forward matches the bytes
    computed from the config (sliding-window layers keep only their window)."""
    src = make_random(tmp_path / "src", family, heads=4, kv_heads=2)
    ckpt = Checkpoint(src, "src")
    windows = torch.randint(3, 64, (4, 24), generator=torch.Generator().manual_seed(1))
    stats = calibrate(ckpt, tmp_path / "s.safetensors", RANDOM_TEXT, CPU, torch.float32, windows=windows)
    conv = Converted(ckpt, plan_compression(ckpt, stats, 1, "weighted", "search", CPU))
    refined, records = refine(conv, windows, RefineOptions(steps=15, batch_size=2), tmp_path / "refine", CPU)
    assert all(r["error_after"] <= r["error_before"] for r in records) and any(r["kept"] for r in records), records
    write_checkpoint(refined, tmp_path / "out", extra_files={})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    select_trainable(model, ckpt.family, "attn")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    modules = ckpt.family.projection_modules()
    assert trained and all(f".{ckpt.family.attention}." in n and n.split(".")[-2] in modules for n in trained)
    report = kv_report(model.eval(), [64], tokens=24)
    assert report["measured_matches"], report
