"""Data-free key -> value lookup probe: which KV heads a long-range *retrieval* needs in full.

The copy probe (`kvconvert.razor.ablation`) scores heads on copying a whole repeated block; a passkey-style
retrieval instead needs one look-up far back: find a cue, then copy the few tokens after it. This probe builds
that from random token ids only (middle half of the vocabulary, seeded): random filler with `pairs` needles
`key value` spread over it, then, after a gap longer than the runtime's window, every key again (shuffled)
followed by its value. The *lookup loss* is the mean next-token loss over those final value tokens, which can
only be predicted by attending to the needle beyond the window. A head's `lookup` score is the lookup loss with
only that head windowed (the runtime's mask, as in the copy probe) minus the full model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvconvert.razor.ablation import masked_losses, single_head_plans


@dataclass(frozen=True)
class LookupSettings:
    """Shape of one lookup probe sequence (`length` tokens in all)."""

    length: int = 1536
    pairs: int = 16
    key: int = 3
    value: int = 4
    prefix: int = 8


def lookup_sequence(vocab_size: int, s: LookupSettings, gap: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, length) token ids and the positions of the value tokens to predict in the final queries.

    The needles sit at random offsets in equal slots of [prefix, length - queries - gap); every needle ends at
    least `gap` tokens before the first query."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = vocab_size // 4, 3 * vocab_size // 4
    pair = s.key + s.value
    queries = s.pairs * pair
    room = s.length - queries - gap - s.prefix
    if room < s.pairs * pair:
        raise ValueError(f"lookup probe: {s.length} tokens leave no room for {s.pairs} needles and a {gap} gap")
    ids = torch.randint(lo, hi, (s.length,), generator=gen)
    keys = torch.randint(lo, hi, (s.pairs, s.key), generator=gen)
    values = torch.randint(lo, hi, (s.pairs, s.value), generator=gen)
    slot = room // s.pairs
    for i in range(s.pairs):
        start = s.prefix + i * slot + int(torch.randint(0, slot - pair + 1, (1,), generator=gen))
        ids[start : start + pair] = torch.cat([keys[i], values[i]])
    order = torch.randperm(s.pairs, generator=gen)
    tail = torch.cat([torch.cat([keys[i], values[i]]) for i in order.tolist()])
    first = s.length - queries
    ids[first:] = tail
    targets = torch.cat([first + j * pair + s.key + torch.arange(s.value) for j in range(s.pairs)])
    return ids[None], targets


def lookup_ranking(
    model, eligible: torch.Tensor, rule: dict, s: LookupSettings, gap: int, seeds: list[int]
) -> tuple[list[tuple[int, int]], dict]:
    """Eligible heads by `lookup` score (largest first) and the scores, averaged over `seeds` sequences."""
    config = model.config.get_text_config()
    device = next(model.parameters()).device
    full = torch.zeros_like(eligible)
    cells, plans = single_head_plans(eligible, full)
    total = torch.zeros(len(cells))
    reference = 0.0
    for seed in seeds:
        ids, targets = lookup_sequence(config.vocab_size, s, gap, seed)
        ids, targets = ids.to(device), targets.to(device)
        losses = masked_losses(model, ids, targets, [full, *plans], rule)
        reference += losses[0] / len(seeds)
        total += (torch.tensor(losses[1:]) - losses[0]) / len(seeds)
    score = dict(zip(cells, total.tolist(), strict=True))
    order = sorted(cells, key=score.get, reverse=True)
    return order, {"full_loss": reference, "lookup": {str(c): v for c, v in score.items()}}


def merge_rankings(*rankings: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """One ranking from several: heads by their best position in any of them (ties: the earlier ranking first),
    so the top of each ranking is kept and no score scale has to be compared."""
    best: dict[tuple[int, int], tuple[int, int]] = {}
    for r, ranking in enumerate(rankings):
        for pos, cell in enumerate(ranking):
            cell = tuple(cell)
            best[cell] = min(best.get(cell, (pos, r)), (pos, r))
    return sorted(best, key=best.get)
