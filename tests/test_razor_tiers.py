"""Window tiers from a ranking: which heads are full, which get which window, and the KV budget they make."""

from __future__ import annotations

import pytest

from kvconvert.razor.tiers import parse_tiers, tiered_heads
from kvconvert.runtime.razor_policy import RazorPolicy

RANKING = [(2, 1), (0, 0), (1, 2), (2, 0), (0, 2), (1, 1)]


def test_tiers_slice_the_ranking_in_order():
    retrieval, fraction = tiered_heads(RANKING, 2, [(1, 0.5), (2, 0.3)], 0.1, num_layers=3, num_kv_heads=3)
    assert retrieval == [[0], [], [1]]
    assert fraction[1][2] == 0.5 and fraction[2][0] == 0.3 and fraction[0][2] == 0.3
    assert fraction[1][1] == fraction[0][1] == 0.1  # past the tiers: the base window
    with pytest.raises(ValueError, match="7 heads"):
        tiered_heads(RANKING, 2, [(5, 0.5)], 0.1, 3, 3)


def test_tiered_budget_is_the_sum_of_each_heads_window():
    retrieval, fraction = tiered_heads(RANKING, 1, [(2, 0.5)], 0.1, num_layers=3, num_kv_heads=3)
    policy = RazorPolicy(tuple(map(tuple, retrieval)), 3, 8, sinks=4, window_floor=16, head_fraction=fraction)
    tokens = 1000
    per_head = 4 + 1  # sinks + compensation
    expected = tokens + 2 * (per_head + 500) + 6 * (per_head + 100)
    assert sum(policy.kept_tokens(i, tokens) for i in range(3)) == expected
    assert policy.kv_bytes(tokens, 1, 2) == 2 * expected * 8 * 2


def test_parse_tiers():
    assert parse_tiers("10:0.4,20:0.2") == [(10, 0.4), (20, 0.2)] and parse_tiers("") == []
