"""Greedy per-(layer, head) rate search under a total cache budget, scored on held-out windows.

Score of a cut: KL(original ‖ cut) on the held-out windows. The search first measures, for every (layer, KV head,
keys/values) and every level below full, the score with only that one cut applied (the rest at full rate): a
table of L·n_kv·2·(levels−1) forward passes. It then descends greedily from full rate: each move lowers one
(layer, head, keys/values) by one level (one `step` of dims, the same bytes for every move), choosing the move whose
measured score rises least, until the kept share is within the budget. Treating the single-cut scores as additive
is the approximation that makes this affordable on CPU (one table serves every budget); the final rates are
checked by a real forward pass (`score`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvconvert.heal.objective import kl_divergence
from kvconvert.matryoshka.projections import Projections
from kvconvert.progress import Progress, Silent
from kvconvert.runtime.matryoshka import MatryoshkaRuntime
from kvconvert.runtime.matryoshka_attention import attention_modules


@dataclass(frozen=True)
class SensitivityTable:
    """scores[l, h, kind, j]: held-out KL with only (l, h, kind) cut to levels[j] (kind 0 keys, 1 values)."""

    levels: torch.Tensor
    scores: torch.Tensor


def _set_rates(model, key_rates: torch.Tensor, value_rates: torch.Tensor) -> None:
    for i, m in enumerate(attention_modules(model)):
        m.matryoshka.set_rates(key_rates[i], value_rates[i])
        m.matryoshka.enabled = True


@torch.no_grad()
def teacher_logits(model, windows: torch.Tensor) -> torch.Tensor:
    for m in attention_modules(model):
        m.matryoshka.enabled = False
    try:
        return model(input_ids=windows, use_cache=False).logits.float()
    finally:
        for m in attention_modules(model):
            m.matryoshka.enabled = True


@torch.no_grad()
def score(model, proj: Projections, windows: torch.Tensor, reference: torch.Tensor) -> float:
    """Held-out KL(original ‖ cut) of `proj`'s rates (model attached to `proj`'s bases)."""
    _set_rates(model, proj.key_rates, proj.value_rates)
    return float(kl_divergence(model(input_ids=windows, use_cache=False).logits, reference))


@torch.no_grad()
def sensitivity_table(
    model,
    proj: Projections,
    windows: torch.Tensor,
    step: int,
    progress: Progress | None = None,
    values_only: bool = False,
) -> SensitivityTable:
    """Single-cut scores for every (layer, head, kind, level below full); `model` attached to `proj`'s bases.

    With `values_only` key cuts are not measured (their score is +inf: never chosen)."""
    MatryoshkaRuntime(proj).attach(model)
    windows = windows.to(next(model.parameters()).device)
    reference = teacher_logits(model, windows)
    layers, n_kv, head_dim = proj.shape
    levels = torch.arange(step, head_dim, step)
    full = torch.full((layers, n_kv), head_dim, dtype=torch.long)
    scores = torch.zeros(layers, n_kv, 2, len(levels), dtype=torch.float64)
    kinds = (1,) if values_only else (0, 1)
    if values_only:
        scores[:, :, 0] = float("inf")
    advance = (progress or Silent()).task("rate sensitivity", layers * n_kv * len(kinds) * len(levels))
    for layer in range(layers):
        for head in range(n_kv):
            for kind in kinds:
                for j, level in enumerate(levels.tolist()):
                    rates = [full.clone(), full.clone()]
                    rates[kind][layer, head] = level
                    scores[layer, head, kind, j] = score(model, proj.with_rates(*rates), windows, reference)
                    advance(1)
    return SensitivityTable(levels, scores)


def greedy_rates(table: SensitivityTable, head_dim: int, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_rates, value_rates) (L, n_kv): greedy one-level descents by least score increase until within budget."""
    layers, n_kv, _, n_levels = table.scores.shape
    # curve[l, h, kind, j]: score at levels[j], with full rate (score 0 by definition) as the last entry
    curve = torch.cat([table.scores, torch.zeros(layers, n_kv, 2, 1, dtype=table.scores.dtype)], dim=-1)
    all_levels = torch.cat([table.levels, torch.tensor([head_dim])])
    pos = torch.full((layers, n_kv, 2), n_levels, dtype=torch.long)  # index into all_levels: start at full
    target = budget * 2 * layers * n_kv * head_dim
    while float(all_levels[pos].sum()) > target + 1e-9:
        movable = (pos > 0) & torch.isfinite(curve.gather(-1, (pos - 1).clamp(min=0)[..., None])[..., 0])
        if not movable.any():
            break
        cur = curve.gather(-1, pos[..., None])[..., 0]
        nxt = curve.gather(-1, (pos - 1).clamp(min=0)[..., None])[..., 0]
        delta = torch.where(movable, nxt - cur, torch.full_like(cur, float("inf")))
        flat = int(torch.argmin(delta))
        pos.view(-1)[flat] -= 1
    rates = all_levels[pos]
    return rates[..., 0].clone(), rates[..., 1].clone()
