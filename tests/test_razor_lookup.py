"""The key -> value lookup probe: its sequence, its scores and merging rankings."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvconvert.razor.ablation import masked_losses
from kvconvert.razor.lookup import LookupSettings, lookup_ranking, lookup_sequence, merge_rankings

RULE = {"sinks": 2, "window_floor": 8, "window_fraction": 0.1}


def test_lookup_sequence_puts_each_needle_beyond_the_gap():
    s = LookupSettings(length=200, pairs=4, key=3, value=2, prefix=5)
    ids, targets = lookup_sequence(1000, s, gap=40, seed=3)
    ids = ids[0].tolist()
    first = 200 - 4 * 5
    assert targets.tolist() == [first + j * 5 + 3 + i for j in range(4) for i in range(2)]
    for j in range(4):  # every query's key, then its value, appears once earlier, ending before the gap
        key, value = ids[first + 5 * j : first + 5 * j + 3], ids[first + 5 * j + 3 : first + 5 * j + 5]
        starts = [p for p in range(first - 4) if ids[p : p + 3] == key]
        assert len(starts) == 1 and ids[starts[0] + 3 : starts[0] + 5] == value
        assert starts[0] >= 5 and starts[0] + 5 <= first - 40
    assert all(250 <= t < 750 for t in ids)  # the middle half of the vocabulary
    assert torch.equal(lookup_sequence(1000, s, 40, 3)[0], lookup_sequence(1000, s, 40, 3)[0])
    with pytest.raises(ValueError, match="no room"):
        lookup_sequence(1000, s, gap=170, seed=0)


def test_lookup_ranking_scores_are_windowed_minus_full_loss(tiny_llama):
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    s = LookupSettings(length=96, pairs=3, key=2, value=3, prefix=4)
    eligible = torch.tensor([[True, False, True, True], [True, True, False, True]])
    order, scores = lookup_ranking(llama, eligible, RULE, s, gap=20, seeds=[5])
    assert sorted(order) == sorted(map(tuple, torch.nonzero(eligible).tolist()))
    ids, targets = lookup_sequence(llama.config.vocab_size, s, 20, 5)
    plan = torch.zeros_like(eligible)
    plan[order[0]] = True
    full, worst = masked_losses(llama, ids, targets, [torch.zeros_like(eligible), plan], RULE)
    assert abs(scores["full_loss"] - full) < 1e-5 and abs(scores["lookup"][str(order[0])] - (worst - full)) < 1e-5
    values = [scores["lookup"][str(c)] for c in order]
    assert values == sorted(values, reverse=True)


def test_merge_rankings_takes_each_rankings_top():
    a = [(0, 0), (1, 1), (2, 2), (3, 0)]
    b = [(3, 0), (0, 0), (1, 2), (1, 1)]
    assert merge_rankings(a, b) == [(0, 0), (3, 0), (1, 1), (2, 2), (1, 2)]
