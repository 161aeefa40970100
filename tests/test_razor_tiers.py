"""Window tiers from a ranking: which heads are full, which get which window, and the KV budget they make."""

from __future__ import annotations

import pytest
import torch

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


def test_a_profile_with_head_fractions_is_served(tmp_path, tiny_llama):
    """`razor:PROFILE.json` whose runtime carries `head_fraction`: each windowed head holds its own window."""
    import json

    from transformers import AutoModelForCausalLM

    from kvconvert.razor.store import SCHEMA
    from kvconvert.runtime import runtime_for

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    fractions = [[0.5, 0.1, 0.1, 0.1], [0.1, 0.1, 0.25, 0.1]]
    runtime = {"sinks": 2, "window_floor": 4, "window_fraction": 0.1, "compensation": True, "head_fraction": fractions}
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"schema": SCHEMA, "retrieval": [[1], []], "runtime": runtime}))
    rt = runtime_for(f"razor:{path}", model)
    assert rt.policy.head_fraction[1][2] == 0.25
    assert rt.policy.kept_tokens(0, 100) == 100 + (2 + 1 + 50) + 2 * (2 + 1 + 10)
    rt.attach(model)
    cache = rt.new_cache(model)
    ids = torch.randint(5, 300, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(0, 100, 25):
            model(input_ids=ids[:, i : i + 25], past_key_values=cache)
    assert cache.storage_bytes() == rt.kv_bytes(100)
