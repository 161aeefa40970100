"""Window tiers: retrieval heads in full, the next heads of a ranking with wider windows, the rest the base window.

A ranking (best first, e.g. an ablation profile's) is cut into consecutive slices: the first `full` heads keep
every token; each tier `(count, fraction)` gives its next `count` heads that window fraction; every other head
gets the base `window_fraction`. The result is a policy's `retrieval` and `head_fraction`.
"""

from __future__ import annotations

from collections.abc import Sequence


def tiered_heads(
    ranking: Sequence[Sequence[int]],
    full: int,
    tiers: Sequence[tuple[int, float]],
    base: float,
    num_layers: int,
    num_kv_heads: int,
) -> tuple[list[list[int]], list[list[float]]]:
    """(retrieval heads per layer, window fraction per layer and KV head) from the first heads of `ranking`."""
    need = full + sum(n for n, _ in tiers)
    if need > len(ranking):
        raise ValueError(f"{need} heads asked of a ranking of {len(ranking)}")
    retrieval: list[list[int]] = [[] for _ in range(num_layers)]
    fraction = [[base] * num_kv_heads for _ in range(num_layers)]
    for layer, head in ranking[:full]:
        retrieval[layer].append(head)
    at = full
    for count, f in tiers:
        for layer, head in ranking[at : at + count]:
            fraction[layer][head] = f
        at += count
    return [sorted(r) for r in retrieval], fraction


def parse_tiers(text: str) -> list[tuple[int, float]]:
    """`COUNT:FRACTION,...` (e.g. `10:0.4,20:0.2`) -> [(10, 0.4), (20, 0.2)]; empty text: no tiers."""
    tiers = []
    for part in filter(None, text.split(",")):
        count, fraction = part.split(":")
        tiers.append((int(count), float(fraction)))
    return tiers
