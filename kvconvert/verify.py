"""Verify stage: reload the written checkpoint with stock transformers and compare it with the in-memory result."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvconvert.converted import Converted
from kvconvert.errors import KVConvertError
from kvconvert.families.base import converted_tensors


@dataclass(frozen=True)
class VerifyResult:
    max_abs_diff: float
    logits_scale: float
    tokens: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= 1e-4 * max(self.logits_scale, 1.0)


def converted_in_memory(conv: Converted, dtype: torch.dtype = torch.float32):
    """The converted model built in memory (new config + final tensors), without touching the output files."""
    from transformers import AutoModelForCausalLM

    ckpt = conv.ckpt
    model = AutoModelForCausalLM.from_config(conv.config, dtype=dtype)
    state = {name: ckpt.tensors.get(name) for name in ckpt.tensors.names()}
    geom = ckpt.family.geometry(ckpt.config).with_kv_heads(conv.plan.num_kv_heads_after)
    for layer in range(len(conv.plan.layers)):
        state.update(converted_tensors(ckpt.family, layer, conv.attention(layer), geom))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise KVConvertError(f"converted tensors do not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def verify(output: Path, reference, tokens: int = 16, seed: int = 0, trust_remote_code: bool = False) -> VerifyResult:
    """Logits of the stock-reloaded `output` against `reference` (the in-memory converted model)."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(
        output, dtype=torch.float32, trust_remote_code=trust_remote_code
    ).eval()
    vocab = reference.config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
    want = reference.float()(ids).logits
    got = reloaded(ids).logits
    return VerifyResult(float((got - want).abs().max()), float(want.abs().max()), tokens)
