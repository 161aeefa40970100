"""Which heads share a new KV head: adjacent, or a deterministic search that minimises the merge error."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence

EXHAUSTIVE_LIMIT = 5000
Group = tuple[int, ...]


def partition_count(n: int, g: int) -> int:
    """Number of ways to split n items into n/g unordered groups of g."""
    k = n // g
    return math.factorial(n) // (math.factorial(g) ** k * math.factorial(k))


def partitions(items: Sequence[int], g: int) -> Iterator[list[Group]]:
    """All partitions of `items` into groups of `g` (the first item always opens the first group)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, g - 1):
        remaining = [x for x in rest if x not in others]
        for tail in partitions(remaining, g):
            yield [(first, *others), *tail]


def adjacent_groups(n: int, g: int) -> list[Group]:
    return [tuple(range(j * g, (j + 1) * g)) for j in range(n // g)]


def search_groups(n: int, g: int, costs: Callable[[Sequence[Group]], Sequence[float]]) -> list[Group]:
    """Groups of g out of n heads with the lowest summed cost: exhaustive when small, else greedy + swaps.

    `costs` scores a batch of groups at once. Never returns a partition costlier than the adjacent one.
    """
    if g == 1 or g == n:
        return adjacent_groups(n, g)
    if partition_count(n, g) <= EXHAUSTIVE_LIMIT:
        candidates = list(itertools.combinations(range(n), g))
        table = dict(zip(candidates, costs(candidates), strict=True))
        return min(partitions(list(range(n)), g), key=lambda p: sum(table[grp] for grp in p))
    pairs = list(itertools.combinations(range(n), 2))
    pair = dict(zip(pairs, costs(pairs), strict=True))
    best = _swap_refine(_greedy_groups(n, g, pair), pair)
    adjacent = adjacent_groups(n, g)
    return best if sum(costs(best)) < sum(costs(adjacent)) else adjacent


def _proxy(group: Group, pair: dict[tuple[int, int], float]) -> float:
    return sum(pair[(a, b)] for a, b in itertools.combinations(sorted(group), 2))


def _greedy_groups(n: int, g: int, pair: dict[tuple[int, int], float]) -> list[Group]:
    left = list(range(n))
    groups: list[Group] = []
    while left:
        candidates = []
        for seed in left:
            grp = [seed]
            while len(grp) < g:
                nxt = min((h for h in left if h not in grp), key=lambda h: _proxy((*grp, h), pair))
                grp.append(nxt)
            candidates.append(tuple(sorted(grp)))
        chosen = min(candidates, key=lambda c: (_proxy(c, pair), c))
        groups.append(chosen)
        left = [h for h in left if h not in chosen]
    return groups


def _swap_refine(groups: list[Group], pair: dict[tuple[int, int], float], max_passes: int = 20) -> list[Group]:
    groups = [tuple(grp) for grp in groups]
    for _ in range(max_passes):
        improved = False
        for i, j in itertools.combinations(range(len(groups)), 2):
            for a, b in itertools.product(groups[i], groups[j]):
                gi = tuple(sorted([x for x in groups[i] if x != a] + [b]))
                gj = tuple(sorted([x for x in groups[j] if x != b] + [a]))
                before = _proxy(groups[i], pair) + _proxy(groups[j], pair)
                if _proxy(gi, pair) + _proxy(gj, pair) < before - 1e-12:
                    groups[i], groups[j] = gi, gj
                    improved = True
                    break
        if not improved:
            break
    return sorted(groups)


def chain_order(n: int, costs: Callable[[Sequence[Group]], Sequence[float]]) -> list[int]:
    """An order of n heads in which neighbours merge cheaply (greedy nearest-neighbour path, best start)."""
    pairs = list(itertools.combinations(range(n), 2))
    pair = dict(zip(pairs, costs(pairs), strict=True))

    def dist(a: int, b: int) -> float:
        return pair[(min(a, b), max(a, b))]

    best: list[int] = []
    best_len = math.inf
    for start in range(n):
        path = [start]
        while len(path) < n:
            path.append(min((h for h in range(n) if h not in path), key=lambda h: dist(path[-1], h)))
        length = sum(dist(a, b) for a, b in itertools.pairwise(path))
        if length < best_len - 1e-12:
            best, best_len = path, length
    return best
