"""Merge math on one attention layer against an independent float64 reference attention."""

import pytest
import torch

from kvconvert.decompose import decompose
from kvconvert.families import AttentionGeometry
from kvconvert.fold import fold_layer
from kvconvert.merge import registry
from kvconvert.merge.moments import AttentionWeights
from tests.reference import attention

METHODS = list(registry.names())  # every registered plug-in


def rnd(*shape):
    return torch.randn(*shape, dtype=torch.float64) / shape[-1] ** 0.5


def copies(base: torch.Tensor, order: list[int], d: int) -> torch.Tensor:
    return torch.cat([base[p * d : (p + 1) * d] for p in order])


def layer_with_copies(geom: AttentionGeometry, order: list[int], biases: bool):
    """Weights whose KV heads are copies of len(set(order)) distinct heads, in `order`."""
    d, h, n = geom.head_dim, geom.hidden_size, len(set(order))
    k, v = copies(rnd(n * d, h), order, d), copies(rnd(n * d, h), order, d)
    kb = copies(torch.randn(n * d, dtype=torch.float64), order, d) if biases else None
    vb = copies(torch.randn(n * d, dtype=torch.float64), order, d) if biases else None
    qb = torch.randn(geom.num_heads * d, dtype=torch.float64) * 0.3 if biases else None
    return AttentionWeights(rnd(geom.num_heads * d, h), k, v, rnd(h, geom.num_heads * d), qb, kb, vb)


def moments(hidden: int, n: int = 4000, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=gen, dtype=torch.float64) + 0.3
    return x.T @ x / n, x.mean(0)


def relative_error(w, new, geom, n_new):
    xs = torch.randn(12, geom.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ref = attention(w, xs, geom)
    return float((attention(new, xs, geom.with_kv_heads(n_new)) - ref).norm() / ref.norm())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_identical_heads_merge_exactly_and_search_finds_them(method, rotary_dim):
    geom = AttentionGeometry(64, 1, 8, 8, 16, rotary_dim)
    w = layer_with_copies(geom, [0, 1, 2, 1, 3, 0, 3, 2], biases=True)
    second, mean = moments(64)
    plan = decompose(lambda _: (second, mean), lambda _: w, geom, 4, method, "search")
    assert sorted(h.kv_heads for h in plan.layers[0].heads) == [(0, 5), (1, 3), (2, 7), (4, 6)]
    assert relative_error(w, fold_layer(w, plan.layers[0], geom), geom, 4) < 1e-10


def test_adjacent_grouping_of_distinct_heads_is_lossy():
    """Sanity check: the exactness above is not trivial."""
    geom = AttentionGeometry(64, 1, 8, 8, 16, 16)
    w = layer_with_copies(geom, [0, 1, 2, 1, 3, 0, 3, 2], biases=True)
    second, mean = moments(64)
    plan = decompose(lambda _: (second, mean), lambda _: w, geom, 4, "svd", "adjacent")
    assert relative_error(w, fold_layer(w, plan.layers[0], geom), geom, 4) > 0.1


def test_gqa_groups_of_identical_kv_heads_merge_exactly():
    """GQA input (2 query heads per KV head): whole query blocks move with their KV head."""
    geom = AttentionGeometry(64, 1, 8, 4, 16, 16)
    w = layer_with_copies(geom, [1, 0, 0, 1], biases=False)
    second, mean = moments(64)
    plan = decompose(lambda _: (second, mean), lambda _: w, geom, 2, "weighted", "search")
    assert sorted(h.kv_heads for h in plan.layers[0].heads) == [(0, 3), (1, 2)]
    assert relative_error(w, fold_layer(w, plan.layers[0], geom), geom, 2) < 1e-10


@pytest.mark.parametrize("grouping", ["adjacent", "search"])
def test_uneven_groups_split_a_kv_head_between_new_heads(grouping):
    """12 query / 4 KV heads -> 3: each new head serves 4 query heads drawn from two old KV heads."""
    geom = AttentionGeometry(48, 1, 12, 4, 16, 16)
    torch.manual_seed(0)
    w = AttentionWeights(rnd(12 * 16, 48), rnd(64, 48), rnd(64, 48), rnd(48, 12 * 16))
    second, mean = moments(48)
    plan = decompose(lambda _: (second, mean), lambda _: w, geom, 3, "weighted", grouping)
    heads = plan.layers[0].heads
    assert sorted(plan.layers[0].query_order) == list(range(12))
    assert all(len(h.query_heads) == 4 for h in heads)
    new = fold_layer(w, plan.layers[0], geom)
    assert new.k_weight.shape == (3 * 16, 48) and new.o_weight.shape == (48, 12 * 16)
    assert relative_error(w, new, geom, 3) < 1.0


def test_weighted_beats_svd_beats_mean_on_a_structured_layer():
    """Heads that are noisy copies: every method is lossy; the weighted objective gives the smallest output error."""
    torch.manual_seed(4)
    geom = AttentionGeometry(64, 1, 8, 8, 16, 16)
    w = layer_with_copies(geom, [0, 0, 1, 1, 2, 2, 3, 3], biases=False)
    noisy = AttentionWeights(
        w.q_weight * torch.rand(8 * 16, 1, dtype=torch.float64) * 2,
        w.k_weight + 0.5 * rnd(128, 64),
        w.v_weight + 0.5 * rnd(128, 64),
        w.o_weight * torch.rand(1, 8 * 16, dtype=torch.float64) * 2,
    )
    second, mean = moments(64)
    errors = {}
    for method in METHODS:
        plan = decompose(lambda _: (second, mean), lambda _: noisy, geom, 4, method, "adjacent")
        errors[method] = relative_error(noisy, fold_layer(noisy, plan.layers[0], geom), geom, 4)
    assert errors["weighted"] < errors["svd"] < errors["mean"], errors


def test_fold_keeps_dtype_and_shapes():
    geom = AttentionGeometry(32, 1, 4, 4, 8, 8)
    w = AttentionWeights(*(t.to(torch.bfloat16) for t in (rnd(32, 32), rnd(32, 32), rnd(32, 32), rnd(32, 32))))
    second, mean = moments(32)
    plan = decompose(lambda _: (second, mean), lambda _: w, geom, 2, "svd", "search")
    new = fold_layer(w, plan.layers[0], geom)
    assert new.k_weight.dtype == torch.bfloat16 and new.k_weight.shape == (16, 32)
    assert new.q_weight.shape == (32, 32) and new.q_bias is None


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_batched_group_losses_match_per_group_losses(method, rotary_dim):
    """The search's batched scorer agrees with each method's own loss of the same group."""
    from kvconvert.decompose import group_problem
    from kvconvert.merge.methods import METHODS as REGISTRY
    from kvconvert.merge.moments import layer_moments
    from kvconvert.merge.rope import pair_coherence

    torch.manual_seed(5)
    geom = AttentionGeometry(64, 1, 8, 4, 16, rotary_dim)
    w = AttentionWeights(rnd(128, 64), rnd(64, 64), rnd(64, 64), rnd(64, 128), None, torch.randn(64).double(), None)
    second, mean = moments(64)
    lm = layer_moments(w, second, mean, geom)
    coherence = pair_coherence(1e4, rotary_dim, 64)
    groups = [(0, 1), (0, 3), (1, 2), (2, 3)]
    batched = REGISTRY[method].batched(lm, geom, coherence)(groups)
    for group, got in zip(groups, batched, strict=True):
        queries = tuple(q for h in group for q in (2 * h, 2 * h + 1))
        want = REGISTRY[method].loss(group_problem(lm, queries, geom, coherence)[1])
        # the scorer takes float32 eigenvalues (ranking only); totals are exact traces
        assert got == pytest.approx((want.key_loss, want.key_total, want.value_loss, want.value_total), rel=1e-4)
