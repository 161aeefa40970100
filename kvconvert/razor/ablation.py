"""Data-free ablation scores for retrieval heads: what windowing a KV head costs on a long-range copy task.

The probe sequence is the echo/induction one (random mid-vocabulary tokens: a prefix, then a block repeated),
with a block longer than the runtime's window, so every token of a later copy can be predicted only by looking
back beyond the window. The *copy loss* is the mean next-token cross-entropy over the later copies. A head is
*windowed* by the runtime's own rule (sink tokens plus a recent window per query, as a mask; the compensation
token is left out). Scores per (layer, KV head), larger = more needed in full:

* `drop`: copy loss with only that head windowed (every other head full) minus the full model's copy loss;
* `add` (the gain `greedy_select` uses): copy loss with every head windowed but the heads chosen so far, minus
  the loss with that head kept in full as well.

`greedy_select` builds the retrieval set in rounds: each round scores the `add` gain of the remaining heads and
adds the best ones; `drop_ranking` ranks heads by `drop` alone (one pass per head).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from kvconvert.progress import Advance, Progress, Silent
from kvconvert.runtime.razor_policy import window

ABLATE = "kvconvert_ablation_probe"


@dataclass(frozen=True)
class WindowPlan:
    """Which KV heads are windowed (layer, KV head) and the (T, T) masks (True = attend)."""

    windowed: torch.Tensor
    window: torch.Tensor
    causal: torch.Tensor


def window_mask(length: int, sinks: int, floor: int, fraction: float) -> torch.Tensor:
    """(T, T) bool: a query sees the first `sinks` tokens and its last `window(floor, fraction, pos + 1)` tokens
    (the runtime's own window rule)."""
    pos = torch.arange(length)
    width = torch.tensor([window(floor, fraction, p + 1) for p in range(length)])
    key, query = pos[None, :], pos[:, None]
    return (key <= query) & ((key < sinks) | (key > query - width[:, None]))


def _ablation_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    plan: WindowPlan | None = kwargs.pop("kvconvert_window_plan", None)
    heads = plan.windowed[module.layer_idx] if plan is not None else None
    if heads is None or not bool(heads.any()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    group = query.shape[1] // key.shape[1]
    on_window = heads.to(query.device).repeat_interleave(group)
    mask = torch.where(on_window[:, None, None], plan.window, plan.causal)[None]
    out = F.scaled_dot_product_attention(
        query, repeat_kv(key, group), repeat_kv(value, group), attn_mask=mask, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def copy_losses(
    model, ids: torch.Tensor, first: int, plans: list[torch.Tensor], rule: dict, advance: Advance | None = None
) -> list[float]:
    """Copy loss (mean NLL of tokens after position `first`, over every row) of `ids` with each plan's heads
    windowed."""
    return [float(r.mean()) for r in copy_row_losses(model, ids, first, plans, rule, advance)]


def copy_row_losses(
    model, ids: torch.Tensor, first: int, plans: list[torch.Tensor], rule: dict, advance: Advance | None = None
) -> list:
    """Per plan, the copy loss of each row of `ids` (a tensor of one loss per row)."""
    return row_losses(model, ids, torch.arange(first + 1, ids.shape[1], device=ids.device), plans, rule, advance)


def masked_losses(
    model, ids: torch.Tensor, targets: torch.Tensor, plans: list[torch.Tensor], rule: dict
) -> list[float]:
    """Mean NLL of the tokens at positions `targets` (each predicted from the one before) of every row of `ids`,
    with each plan's heads windowed."""
    return [float(r.mean()) for r in row_losses(model, ids, targets, plans, rule)]


@torch.no_grad()
def row_losses(
    model,
    ids: torch.Tensor,
    targets: torch.Tensor,
    plans: list[torch.Tensor],
    rule: dict,
    advance: Advance | None = None,
) -> list:
    """Per plan, a (rows,) tensor: each row's mean NLL of the tokens at positions `targets` (`advance`: called
    once per plan, i.e. per forward pass)."""
    length = ids.shape[1]
    window = window_mask(length, rule["sinks"], rule["window_floor"], rule["window_fraction"]).to(ids.device)
    causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
    first = int(targets.min()) - 1
    previous = model.config.get_text_config()._attn_implementation
    AttentionInterface.register(ABLATE, _ablation_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ABLATE, sdpa_mask)  # else no mask at all: sliding layers would see all
    model.set_attn_implementation(ABLATE)
    losses = []
    try:
        for windowed in plans:
            plan = WindowPlan(windowed, window, causal)
            logits = model(
                input_ids=ids, use_cache=False, kvconvert_window_plan=plan, logits_to_keep=length - first
            ).logits
            pred = logits.index_select(1, targets - 1 - first).float()
            nll = F.cross_entropy(pred.flatten(0, 1), ids[:, targets].flatten(), reduction="none")
            losses.append(nll.view(ids.shape[0], -1).mean(1).cpu())
            if advance:
                advance()
    finally:
        model.set_attn_implementation(previous)
    return losses


def single_head_plans(eligible: torch.Tensor, base: torch.Tensor) -> tuple[list[tuple[int, int]], list]:
    """The eligible heads and, for each, `base` with that head's bit flipped."""
    cells = [tuple(c) for c in torch.nonzero(eligible).tolist()]
    plans = []
    for layer, head in cells:
        plan = base.clone()
        plan[layer, head] = ~plan[layer, head]
        plans.append(plan)
    return cells, plans


def drop_ranking(
    model, ids: torch.Tensor, first: int, eligible: torch.Tensor, rule: dict, advance: Advance | None = None
) -> tuple[list[tuple[int, int]], dict]:
    """Eligible heads by `drop` score, largest first, and the scores: the copy loss with only that head windowed
    (every other head full) minus the full model's copy loss."""
    full = torch.zeros_like(eligible)
    reference = copy_row_losses(model, ids, first, [full], rule, advance)[0]
    cells, plans = single_head_plans(eligible, full)
    per_row = torch.stack(copy_row_losses(model, ids, first, plans, rule, advance)) - reference  # (heads, rows)
    drop = dict(zip(cells, per_row.mean(1).tolist(), strict=True))
    order = sorted(cells, key=drop.get, reverse=True)
    scores = {"full_loss": float(reference.mean()), "drop": {str(c): d for c, d in drop.items()}}
    if ids.shape[0] > 1:  # one ranking per probe sequence (seed), to say how stable the selection is
        scores["seed_rankings"] = [[list(cells[i]) for i in col.argsort(descending=True).tolist()] for col in per_row.T]
    return order, scores


def greedy_select(
    model,
    ids: torch.Tensor,
    first: int,
    eligible: torch.Tensor,
    rule: dict,
    count: int,
    rounds: int,
    pool: int = 0,
    progress: Callable[[dict], None] | None = None,
    advance: Advance | None = None,
) -> tuple[list[tuple[int, int]], list[dict]]:
    """Up to `count` heads in `rounds` rounds of `add` gains given the heads already chosen (every other head
    windowed); after the first round only the `pool` best heads of the previous round are re-scored (0: all).
    Returns the heads in the order chosen (best first) and one record per round."""
    order: list[tuple[int, int]] = []
    gains: dict[tuple[int, int], float] = {}
    history = []
    for r in range(rounds):
        left = count - len(order)
        if left <= 0:
            break
        chosen = torch.zeros_like(eligible)
        for cell in order:
            chosen[cell] = True
        candidates = eligible & ~chosen
        if r and pool:
            ranked = sorted((c for c in gains if not chosen[c]), key=gains.get, reverse=True)[:pool]
            candidates = torch.zeros_like(eligible)
            for cell in ranked:
                candidates[cell] = True
        base = eligible & ~chosen
        reference = copy_losses(model, ids, first, [base], rule, advance)[0]
        cells, plans = single_head_plans(candidates, base)
        losses = copy_losses(model, ids, first, plans, rule, advance)
        gains = dict(zip(cells, (reference - x for x in losses), strict=True))
        take = math.ceil(left / (rounds - r))
        order += sorted(cells, key=gains.get, reverse=True)[:take]
        history.append(
            {"round": r, "loss": reference, "scored": len(cells), "gains": {str(c): g for c, g in gains.items()}}
        )
        if progress:
            progress(history[-1])
    return order, history


def selection_stability(seed_rankings: list[list[list[int]]], chosen: list[tuple[int, int]]) -> dict:
    """Jaccard index of each seed's own top heads (as many as chosen) with the selection from all seeds."""
    pick = {tuple(c) for c in chosen}
    overlaps = [
        len(pick & {tuple(c) for c in r[: len(pick)]}) / len(pick | {tuple(c) for c in r[: len(pick)]})
        for r in seed_rankings
    ]
    return {"jaccard_per_seed": overlaps, "jaccard_min": min(overlaps), "jaccard_mean": sum(overlaps) / len(overlaps)}


def copy_sequences(vocab_size: int, block: int, repeats: int, prefix: int, seeds: list[int]) -> torch.Tensor:
    """(seeds, prefix + block·repeats) probe sequences, one per seed (the echo/induction probe's)."""
    from kvconvert.razor.profile import ProfileSettings, probe_sequence

    s = ProfileSettings(block=block, repeats=repeats, prefix=prefix)
    return torch.cat([probe_sequence(vocab_size, s, seed) for seed in seeds])


def profile_ablation(
    model,
    eligible: torch.Tensor,
    rule: dict,
    *,
    block: int,
    repeats: int,
    seeds: int,
    fraction: float,
    rounds: int,
    pool: int,
    greedy: bool = True,
    prefix: int = 8,
    progress: Progress | None = None,
) -> dict:
    """Ablation profile: the ranked heads (greedy `add` rounds, or single-head `drop` scores), the retrieval
    heads (top `fraction` of the eligible ones), the scores, and copy losses on a held-out seed (full, selected,
    all windowed, random heads)."""
    config = model.config.get_text_config()
    device = next(model.parameters()).device
    ids = copy_sequences(config.vocab_size, block, repeats, prefix, list(range(seeds))).to(device)
    first = prefix + block
    count = math.ceil(fraction * int(eligible.sum()))
    passes = None if greedy else int(eligible.sum()) + 5  # greedy: as many as its rounds need
    advance = (progress or Silent()).task(f"profile: forward passes of {ids.shape[1]} tokens", passes)
    if greedy:
        order, history = greedy_select(model, ids, first, eligible, rule, count, rounds, pool, advance=advance)
        scores: dict = {"rounds": history}
    else:
        order, scores = drop_ranking(model, ids, first, eligible, rule, advance)
        order = order[:count]
        if "seed_rankings" in scores:
            scores["stability"] = selection_stability(scores.pop("seed_rankings"), order)
    chosen = torch.zeros_like(eligible)
    for cell in order:
        chosen[cell] = True
    gen = torch.Generator().manual_seed(seeds)
    cells = torch.nonzero(eligible)
    rand = torch.zeros_like(eligible)
    for layer, head in cells[torch.randperm(len(cells), generator=gen)[: len(order)]].tolist():
        rand[layer, head] = True
    held_out = copy_sequences(config.vocab_size, block, repeats, prefix, [seeds]).to(device)
    plans = [torch.zeros_like(eligible), eligible & ~chosen, eligible.clone(), eligible & ~rand]
    losses = copy_losses(model, held_out, first, plans, rule, advance)
    return {
        "ranking": [list(c) for c in order],
        "retrieval": [torch.nonzero(row).flatten().tolist() for row in chosen],
        **scores,
        "held_out_copy_loss": dict(zip(("full", "selected", "windowed", "random"), losses, strict=True)),
    }
