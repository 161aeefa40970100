"""Decompose stage: calibration statistics + attention weights -> compression plan. No IO."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import get_args

import torch

from kvconvert.config import Grouping
from kvconvert.families import AttentionGeometry
from kvconvert.memory import release_memory
from kvconvert.merge import grouping as grp
from kvconvert.merge import registry
from kvconvert.merge.losses import group_losses
from kvconvert.merge.moments import AttentionWeights, LayerMoments, layer_moments
from kvconvert.merge.pca import psd_sqrt
from kvconvert.merge.problem import GroupProblem, MergeLoss
from kvconvert.merge.qknorm import key_maps, with_norm_key_maps
from kvconvert.plan import CompressionPlan, LayerPlan, NewHead

GROUPINGS = get_args(Grouping)
PLAN_WORKERS = 16
QK_NORM_MERGES = ("normalised", "linear")  # QK-norm families: norm-carried key maps, or the method's maps as is


def plan_threads(cores: int, layers: int) -> tuple[int, int]:
    """(workers, CPU threads per worker) for planning `layers` layers on `cores` threads: workers x threads never
    exceeds `cores`. A worker thread otherwise opens an OpenMP team of every core for each eigen-solve: 8 workers
    on 16 cores ran 128 threads, and a 7B-shaped layer took 30 s, about 3 s on one thread (docs/results/gpu.md)."""
    workers = max(1, min(PLAN_WORKERS, cores, layers))
    return workers, max(1, cores // workers)


def group_problem(
    lm: LayerMoments,
    queries: tuple[int, ...],
    geom: AttentionGeometry,
    coherence: torch.Tensor,
    sqrt_cache: dict | None = None,
) -> tuple[tuple[int, ...], GroupProblem]:
    """The sources (old KV heads read by `queries`) and the moments of their merge.

    `sqrt_cache` memoises the weight square roots per (source, queries reading it) across calls.
    """
    d, n_rep = geom.head_dim, geom.n_rep
    sources = tuple(sorted({i // n_rep for i in queries}))
    dev = lm.key_moment.device
    idx = torch.cat([torch.arange(s * d, (s + 1) * d) for s in sources]).to(dev)
    n_pairs, n_pass = lm.query_pair_energy.shape[1], lm.query_pass_moment.shape[1]
    pair_energy = torch.zeros(len(sources), n_pairs, dtype=torch.float64, device=dev)
    pass_moment = torch.zeros(len(sources), n_pass, n_pass, dtype=torch.float64, device=dev)
    out_gram = torch.zeros(len(sources), d, d, dtype=torch.float64, device=dev)
    for i in queries:
        s = sources.index(i // n_rep)
        pair_energy[s] += lm.query_pair_energy[i]
        pass_moment[s] += lm.query_pass_moment[i]
        out_gram[s] += lm.out_gram[i]
    cache = {} if sqrt_cache is None else sqrt_cache
    pass_sqrt, out_sqrt = [], []
    for s, src in enumerate(sources):
        key = (src, tuple(i for i in queries if i // n_rep == src))
        if key not in cache:
            cache[key] = (psd_sqrt(pass_moment[s]), psd_sqrt(out_gram[s]))
        pass_sqrt.append(cache[key][0])
        out_sqrt.append(cache[key][1])
    cpu = torch.device("cpu")
    problem = GroupProblem(
        head_dim=d,
        rotary_dim=geom.rotary_dim,
        key_moment=lm.key_moment[idx][:, idx].to(cpu),
        key_mean=lm.key_mean[idx].to(cpu),
        value_moment=lm.value_moment[idx][:, idx].to(cpu),
        query_pair_energy=pair_energy.to(cpu),
        query_pass_sqrt=torch.stack(pass_sqrt).to(cpu),
        out_sqrt=torch.stack(out_sqrt).to(cpu),
        pair_coherence=coherence,
    )
    return sources, problem


def plan_layer(
    lm: LayerMoments,
    geom: AttentionGeometry,
    n_new: int,
    method: str,
    grouping: str,
    coherence: torch.Tensor,
    protected: frozenset[int] = frozenset(),
    qk_norm: str = "normalised",
) -> LayerPlan:
    """Choose the groups (per `grouping`) and merge each with `method`. With `protected` (retrieval KV heads of a
    RazorAttention profile), the search weights a group's cost by 1 + its retrieval heads, x1000 past one."""
    m = registry.get(method)
    n_kv, n_rep = geom.num_kv_heads, geom.n_rep
    sqrt_cache: dict = {}
    losses: dict[tuple[int, ...], MergeLoss] = {}

    def problem(queries: tuple[int, ...]) -> tuple[tuple[int, ...], GroupProblem]:
        return group_problem(lm, queries, geom, coherence, sqrt_cache)

    def loss(queries: tuple[int, ...]) -> MergeLoss:
        if queries not in losses:
            losses[queries] = m.loss(problem(queries)[1])
        return losses[queries]

    def head(queries: tuple[int, ...]) -> NewHead:
        sources, p = problem(queries)
        merge = m.merge(p)
        if lm.key_rms is not None and qk_norm == "normalised":  # QK-norm: key maps the norms carry (qknorm.py)
            src, d = list(sources), geom.head_dim
            idx = torch.cat([torch.arange(s * d, (s + 1) * d) for s in src]).to(lm.key_unit_moment.device)
            unit = lm.key_unit_moment[idx][:, idx].cpu()
            maps = key_maps(unit, p.query_pair_energy, lm.key_rms[src], lm.key_weight[src], d, geom.rotary_dim)
            merge = with_norm_key_maps(merge, *maps)
        return NewHead(queries, sources, merge)

    def queries_of(kv_heads: Iterable[int]) -> tuple[int, ...]:
        return tuple(q for h in kv_heads for q in range(h * n_rep, (h + 1) * n_rep))

    chunk = geom.num_heads // n_new

    def chunked(order: list[int]) -> list[tuple[int, ...]]:
        qs = queries_of(order)
        return [qs[j * chunk : (j + 1) * chunk] for j in range(n_new)]

    adjacent = chunked(list(range(n_kv)))
    if grouping == "adjacent":
        assignment = adjacent
    elif n_kv % n_new == 0:
        table = group_losses(lm, geom, method, coherence)
        scored = table(grp.adjacent_groups(n_kv, n_kv // n_new))
        key_total = sum(s[1] for s in scored) or 1.0
        value_total = sum(s[3] for s in scored) or 1.0

        def role(g) -> float:
            n = len(protected.intersection(g))
            return (1 + n) * (1000.0 if n > 1 else 1.0)

        def costs(groups):
            return [
                (kl / key_total + vl / value_total) * role(g)
                for g, (kl, _, vl, _) in zip(groups, table(groups), strict=True)
            ]

        assignment = [queries_of(g) for g in grp.search_groups(n_kv, n_kv // n_new, costs)]
    else:
        key_total = sum(loss(q).key_total for q in adjacent) or 1.0
        value_total = sum(loss(q).value_total for q in adjacent) or 1.0

        def cost_q(queries: tuple[int, ...]) -> float:
            lq = loss(queries)
            return lq.key_loss / key_total + lq.value_loss / value_total

        ordered = chunked(grp.chain_order(n_kv, lambda groups: [cost_q(queries_of(g)) for g in groups]))
        assignment = min((ordered, adjacent), key=lambda a: sum(map(cost_q, a)))
    return LayerPlan(tuple(head(q) for q in assignment))


def decompose(
    moments_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    weights_of: Callable[[int], AttentionWeights],
    geom: AttentionGeometry,
    n_new: int,
    method: str = "weighted",
    grouping: str = "search",
    coherence: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    on_layer: Callable[[int, LayerPlan], None] | None = None,
    protected: Sequence[Iterable[int]] | None = None,
    qk_norm: str = "normalised",
    order: Sequence[int] | None = None,
) -> CompressionPlan:
    """Plan every layer. `moments_of(layer)` gives (E[x xᵀ], E[x]) of the attention input in float64.

    Layers are started in `order` (default 0, 1, ...) and each finished one is handed to `on_layer(layer, plan)`
    at once (a writer can use it before the others are done); an error there stops the planning."""
    registry.get(method)  # unknown -> ValueError naming the methods
    if qk_norm not in QK_NORM_MERGES:
        raise ValueError(f"unknown QK-norm merge {qk_norm!r}; choose from {', '.join(QK_NORM_MERGES)}")
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose from {', '.join(GROUPINGS)}")
    if coherence is None:
        coherence = torch.zeros(geom.rotary_dim // 2, dtype=torch.float64)
    # The grouping search and the merges are CPU eigen-solves that release the GIL: plan several layers at once
    # (`plan_threads`: workers x their own OpenMP threads <= torch's thread count), while the next layers' moments
    # are formed on `device`. With one thread this is the plain sequential loop.
    order = list(range(geom.num_layers)) if order is None else list(order)
    if sorted(order) != list(range(geom.num_layers)):
        raise ValueError(f"order must list each of the {geom.num_layers} layers once")
    workers, per_worker = plan_threads(torch.get_num_threads(), geom.num_layers)
    layers: list[LayerPlan | None] = [None] * geom.num_layers
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(per_worker,)) as pool:
        pending: dict[Future, int] = {}
        try:
            for layer in order:
                second, mean = moments_of(layer)
                lm = layer_moments(weights_of(layer), second.to(device), mean.to(device), geom)
                keep = frozenset(protected[layer]) if protected else frozenset()
                job = (lm, geom, n_new, method, grouping, coherence, keep, qk_norm)
                pending[pool.submit(plan_layer, *job)] = layer
                del lm, second, mean
                if len(pending) >= 2 * workers:
                    _collect(pending, layers, on_layer, wait_all=False)
            _collect(pending, layers, on_layer, wait_all=True)
        except BaseException:
            for fut in pending:  # do not plan layers nobody will use
                fut.cancel()
            raise
    release_memory()
    return CompressionPlan(method, grouping, geom.num_kv_heads, n_new, tuple(layers))


def _collect(pending: dict, layers: list, on_layer: Callable[[int, LayerPlan], None] | None, wait_all: bool) -> None:
    """Store finished layer plans (all of them, or at least one), reporting each to `on_layer`."""
    done, _ = wait(pending, return_when=ALL_COMPLETED if wait_all else FIRST_COMPLETED)
    for fut in done:
        layer = pending.pop(fut)
        layers[layer] = fut.result()
        if on_layer:
            on_layer(layer, layers[layer])
