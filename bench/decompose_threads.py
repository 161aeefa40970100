"""Planning threads: the grouping search + merges of random 7B-shaped layers (CPU), under the old thread policy
(min(8, cores) workers, each opening an OpenMP team of every core) and `decompose.plan_threads` (workers x threads
<= cores). Prints a table; the H200 host ran the old policy at ~30 s per layer (docs/results/gpu.md).

    python -m bench.decompose_threads [--hidden 4096] [--layers 4] [--cores N]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from kvconvert.decompose import plan_layer, plan_threads
from kvconvert.families import AttentionGeometry
from kvconvert.merge.moments import layer_moments
from kvconvert.merge.rope import pair_coherence
from kvconvert.types import AttentionWeights


def random_layer(hidden: int, head_dim: int = 128):
    """Moments of one random MHA layer (Llama-2-7B shapes at hidden 4096) from a random correlated input."""
    torch.manual_seed(0)
    heads = hidden // head_dim
    geom = AttentionGeometry(hidden, 1, heads, heads, head_dim, head_dim)
    x = torch.randn(2 * hidden, hidden) @ (torch.randn(hidden, hidden) / hidden**0.5 + torch.eye(hidden))
    second, mean = (x.T @ x / x.shape[0]).double(), x.mean(0).double()

    def w(o: int, i: int) -> torch.Tensor:
        return torch.randn(o, i) * i**-0.5

    weights = AttentionWeights(w(hidden, hidden), w(hidden, hidden), w(hidden, hidden), w(hidden, hidden))
    return layer_moments(weights, second, mean, geom), geom


def timed(lm, geom, layers: int, workers: int, per_worker: int | None) -> float:
    coherence = pair_coherence(10000.0, geom.head_dim, 4096)
    init = (torch.set_num_threads, (per_worker,)) if per_worker else (None, ())
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers, initializer=init[0], initargs=init[1]) as pool:
        list(
            pool.map(
                lambda _: plan_layer(lm, geom, geom.num_kv_heads // 4, "weighted", "search", coherence), range(layers)
            )
        )
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--cores", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.cores)
    lm, geom = random_layer(a.hidden)
    old = (max(1, min(8, a.cores, a.layers)), None)  # a new thread's OpenMP team: every core
    new = plan_threads(a.cores, a.layers)
    print(
        f"{a.layers} layers, hidden {a.hidden}, {geom.num_heads} -> {geom.num_kv_heads // 4} KV heads, {a.cores} cores"
    )
    print("| policy | workers | threads per worker | seconds | s per layer |\n|---|---:|---:|---:|---:|")
    for name, (workers, per) in (("old", old), ("plan_threads", new)):
        s = timed(lm, geom, a.layers, workers, per)
        print(
            f"| {name} | {workers} | {per or 'all (' + str(a.cores) + ')'} | {s:.1f} | {s / a.layers:.2f} |", flush=True
        )


if __name__ == "__main__":
    main()
