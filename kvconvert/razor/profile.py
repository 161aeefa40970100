"""Data-free retrieval-head profiling (RazorAttention, arXiv 2407.15891).

A block of random tokens from the middle of the vocabulary is repeated `repeats` times after a short random
prefix and run through the model once. A probe attention function (registered with `AttentionInterface`) runs
SDPA as usual and, for a sample of queries in the repeated copies, also computes their attention rows. For query
position p holding token t, earlier copies of t sit at p - m·L (m = 1, 2, …): the *echo* score of a head is the
attention mass on those positions, the *induction* score the mass on p - m·L + 1 (the tokens that followed them).
Scores are averaged over the sampled queries, then maximised over the query heads that read each KV head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PROBE = "kvconvert_profile_probe"


@dataclass(frozen=True)
class ProfileSettings:
    """How the probe sequence is built and how heads are selected."""

    block: int = 512
    repeats: int = 4
    prefix: int = 8
    queries: int = 256
    seeds: tuple[int, ...] = (0, 1, 2)
    induction_fraction: float = 0.14
    echo_fraction: float = 0.01


class Probe:
    """Collects (layer -> (echo, induction) per query head) during one forward pass."""

    def __init__(self, query_pos: torch.Tensor, block: int, prefix: int):
        self.query_pos, self.block, self.prefix = query_pos, block, prefix
        self.scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        q = query[0, :, self.query_pos].float()  # (heads, n, d)
        k = repeat_kv(key, query.shape[1] // key.shape[1])[0].float()  # (heads, T, d)
        logits = torch.einsum("hnd,htd->hnt", q, k) * scaling
        t = torch.arange(k.shape[1], device=k.device)
        logits.masked_fill_(t[None, None, :] > self.query_pos[None, :, None], float("-inf"))
        probs = logits.softmax(-1)
        copy = (self.query_pos - self.prefix) // self.block  # earlier copies: 1..copy
        m = torch.arange(1, int(copy.max()) + 1, device=k.device)
        echo_pos = self.query_pos[:, None] - m[None, :] * self.block  # (n, copies)
        valid = m[None, :] <= copy[:, None]
        rows = torch.arange(len(self.query_pos), device=k.device)[:, None].expand_as(echo_pos)

        def mass(pos: torch.Tensor) -> torch.Tensor:
            picked = probs[:, rows, pos.clamp(min=0)] * valid[None]
            return picked.sum(-1).mean(-1)

        self.scores[layer] = (mass(echo_pos), mass(echo_pos + 1))


def _probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    probe: Probe | None = kwargs.pop("kvconvert_probe", None)
    if probe is not None:
        probe.record(module.layer_idx, query, key, scaling or query.shape[-1] ** -0.5)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def probe_sequence(vocab_size: int, s: ProfileSettings, seed: int) -> torch.Tensor:
    """prefix + block repeated: token ids drawn from the middle half of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = vocab_size // 4, 3 * vocab_size // 4
    prefix = torch.randint(lo, hi, (s.prefix,), generator=gen)
    block = torch.randint(lo, hi, (s.block,), generator=gen)
    return torch.cat([prefix, block.repeat(s.repeats)])[None]


@torch.no_grad()
def head_scores(model, s: ProfileSettings, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(echo, induction) per (layer, KV head) for one seed: max over the query heads of each KV head."""
    config = model.config.get_text_config()
    device = next(model.parameters()).device
    ids = probe_sequence(config.vocab_size, s, seed).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    first = s.prefix + s.block  # queries from the second copy on
    query_pos = torch.randperm(ids.shape[1] - first, generator=gen)[: s.queries].sort().values + first
    probe = Probe(query_pos.to(device), s.block, s.prefix)
    previous = config._attn_implementation
    AttentionInterface.register(PROBE, _probe_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PROBE, sdpa_mask)  # else no mask at all: sliding layers would see all
    model.set_attn_implementation(PROBE)
    try:
        model(input_ids=ids, use_cache=False, kvconvert_probe=probe)
    finally:
        model.set_attn_implementation(previous)
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    echo, induction = (
        torch.stack([probe.scores[i][j].view(n_kv, -1).amax(-1) for i in range(config.num_hidden_layers)]).cpu()
        for j in (0, 1)
    )
    return echo, induction


def select(echo: torch.Tensor, induction: torch.Tensor, s: ProfileSettings, eligible: torch.Tensor) -> torch.Tensor:
    """Bool (layer, KV head): top `induction_fraction` by induction plus top `echo_fraction` by echo."""
    n = int(eligible.sum())
    chosen = torch.zeros_like(eligible)
    for scores, fraction in ((induction, s.induction_fraction), (echo, s.echo_fraction)):
        k = math.ceil(fraction * n) if fraction > 0 else 0
        flat = scores.masked_fill(~eligible, float("-inf")).flatten()
        chosen.view(-1)[flat.topk(k).indices] = True
    return chosen & eligible


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def profile_model(model, s: ProfileSettings, eligible: torch.Tensor, progress=None) -> dict:
    """Scores averaged over seeds, the selected retrieval heads and how stable the selection is across seeds."""
    per_seed = []
    for seed in s.seeds:
        per_seed.append(head_scores(model, s, seed))
        if progress:
            progress(1)
    echo = torch.stack([e for e, _ in per_seed]).mean(0)
    induction = torch.stack([i for _, i in per_seed]).mean(0)
    chosen = select(echo, induction, s, eligible)
    seeds = [select(e, i, s, eligible) for e, i in per_seed]
    overlaps = [jaccard(c, chosen) for c in seeds]
    return {
        "echo": echo.tolist(),
        "induction": induction.tolist(),
        "retrieval": [torch.nonzero(row).flatten().tolist() for row in chosen],
        "stability": {
            "jaccard_per_seed": overlaps,
            "jaccard_min": min(overlaps),
            "jaccard_mean": sum(overlaps) / len(overlaps),
        },
    }
