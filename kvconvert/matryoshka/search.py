"""Per-(layer, head) rate search under a total cache budget: moves of dims between heads, from the uniform cut.

Score of a cut on held-out windows: KL(original ‖ cut), or their next-token cross-entropy (`objective="ce"`).
A *unit* is one (layer, KV head, keys/values); its rate moves in steps of `step` dims. The search starts at the
uniform rate r0 (topped up to the budget by the units whose next block promises most) and then tries *swaps* at
constant budget: one unit gives a block, another takes one. Candidates are ranked by a cheap proxy — the gradient
of the score with respect to per-dim masks, taken at the uniform cuts r0 − step, r0 and r0 + step; the cost of
cutting a unit from lo + step to lo is −½(g_lo + g_hi) summed over that block (a trapezoid, so the curvature
between the two cuts counts) — and each candidate is *accepted only if a real forward pass on the held-out windows
lowers the score*. So the result is never worse than its start on those windows; rates stay within one step of
r0, and a unit moves at most once (its proxy is stale afterwards).

Why not greedy descent from full rate on single-cut scores (the search this replaced): with every other head at
full rate, one cut's KL is tiny and noisy, and adding those scores up ignores that cuts compound. It drove rates
to the extremes (at 50 %: 33 of 90 key units kept at 64 dims, 21 value units at 8) and lost to the uniform cut at
75 / 50 / 37.5 % (docs/results/matryoshka.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvconvert.heal.objective import kl_divergence
from kvconvert.matryoshka.projections import Projections, uniform_rate
from kvconvert.progress import Progress, Silent
from kvconvert.runtime.matryoshka import MatryoshkaRuntime
from kvconvert.runtime.matryoshka_attention import attention_modules

Unit = tuple[int, int, int]  # (layer, KV head, kind): kind 0 keys, 1 values


@dataclass(frozen=True)
class SearchResult:
    projections: Projections
    uniform_kl: float  # at the start (uniform rate, topped up to the budget)
    kl: float
    tried: int  # real forwards spent on candidate moves
    moves: list[tuple[Unit, Unit]]  # accepted (giver, taker)


def _set_rates(model, key_rates: torch.Tensor, value_rates: torch.Tensor) -> None:
    for i, m in enumerate(attention_modules(model)):
        m.matryoshka.set_rates(key_rates[i], value_rates[i])
        m.matryoshka.enabled = True


@torch.no_grad()
def teacher_logits(model, windows: torch.Tensor) -> torch.Tensor:
    for m in attention_modules(model):
        m.matryoshka.enabled = False
    try:
        return model(input_ids=windows, use_cache=False).logits.float()
    finally:
        for m in attention_modules(model):
            m.matryoshka.enabled = True


def search_loss(logits: torch.Tensor, reference: torch.Tensor | None, windows: torch.Tensor) -> torch.Tensor:
    """KL(original ‖ cut) against `reference` logits, or next-token cross-entropy of `windows` when it is None."""
    if reference is not None:
        return kl_divergence(logits, reference)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten())


@torch.no_grad()
def score(model, proj: Projections, windows: torch.Tensor, reference: torch.Tensor | None) -> float:
    """Held-out KL(original ‖ cut) (or CE, `reference` None) of `proj`'s rates (model attached to its bases)."""
    _set_rates(model, proj.key_rates, proj.value_rates)
    return float(search_loss(model(input_ids=windows, use_cache=False).logits, reference, windows))


def mask_gradients(model, proj: Projections, windows: torch.Tensor, reference: torch.Tensor | None, chunk: int = 2):
    """d KL / d mask (L, n_kv, 2, D) at `proj`'s rates: per-dim masks of keys (kind 0) and values (kind 1)."""
    mods = attention_modules(model)
    dims = torch.arange(proj.shape[2])
    device = next(model.parameters()).device
    masks = [
        torch.stack([dims < proj.key_rates[i][:, None], dims < proj.value_rates[i][:, None]]).float().to(device)
        for i in range(len(mods))
    ]
    for m in masks:
        m.requires_grad_(True)
    grads = [torch.zeros_like(m) for m in masks]
    try:
        for i, m in enumerate(mods):
            m.matryoshka.enabled = True
            m.matryoshka.soft_masks = (masks[i][0], masks[i][1])
        for lo in range(0, len(windows), chunk):
            logits = model(input_ids=windows[lo : lo + chunk], use_cache=False).logits
            part = None if reference is None else reference[lo : lo + chunk]
            loss = search_loss(logits, part, windows[lo : lo + chunk]) * len(windows[lo : lo + chunk]) / len(windows)
            for g, d in zip(grads, torch.autograd.grad(loss, masks), strict=True):
                g += d
    finally:
        for m in mods:
            m.matryoshka.soft_masks = None
    return torch.stack(grads).transpose(1, 2).cpu().double()  # (L, 2, n_kv, D) -> (L, n_kv, 2, D)


def cut_cost(g_lo: torch.Tensor, g_hi: torch.Tensor, lo: int, step: int) -> torch.Tensor:
    """Proxy KL increase (L, n_kv, 2) of cutting each unit from lo + step to lo dims, from the mask gradients at the
    two cuts: the block's masks go 1 -> 0, so ΔKL ≈ −∫ g ≈ −½(g_lo + g_hi) summed over the block."""
    return -0.5 * (g_lo[..., lo : lo + step] + g_hi[..., lo : lo + step]).sum(-1)


def candidate_swaps(
    rates: torch.Tensor, costs: dict[int, torch.Tensor], step: int, frozen: torch.Tensor, limit: int
) -> list[tuple[float, int, int]]:
    """Best `limit` (proxy ΔKL < 0, giver flat index, taker flat index) for rates (L, n_kv, 2).

    A giver at r needs costs[r − step] (its saving is −cost), a taker at r needs costs[r]; frozen units never move."""
    flat = rates.reshape(-1)
    inf = torch.full(flat.shape, float("inf"), dtype=torch.float64)
    give, take = inf.clone(), inf.clone()
    for lo, c in costs.items():
        c = c.reshape(-1)
        give = torch.where(flat == lo + step, c, give)  # cutting a giver raises the KL by c
        take = torch.where(flat == lo, -c, take)  # growing a taker lowers it by c
    give[frozen.reshape(-1)] = float("inf")
    take[frozen.reshape(-1)] = float("inf")
    k = min(limit, len(flat))
    gi, ti = torch.topk(-give, k).indices, torch.topk(-take, k).indices
    pairs = [(float(give[a] + take[b]), int(a), int(b)) for a in gi for b in ti if a != b]
    return sorted(p for p in pairs if p[0] < 0)[:limit]


def _unit(flat: int, n_kv: int) -> Unit:
    return flat // (2 * n_kv), flat // 2 % n_kv, flat % 2


def _proj_at(proj: Projections, rates: torch.Tensor) -> Projections:
    return proj.with_rates(rates[..., 0], rates[..., 1])


def refine_rates(
    model,
    proj: Projections,
    windows: torch.Tensor,
    budget: float,
    step: int,
    evals: int = 16,
    values_only: bool = False,
    progress: Progress | None = None,
    objective: str = "kl",
) -> SearchResult:
    """Per-unit rates within `budget` (kept share of the cache), never worse on `windows` than the start."""
    MatryoshkaRuntime(proj).attach(model)
    windows = windows.to(next(model.parameters()).device)
    reference = teacher_logits(model, windows) if objective == "kl" else None  # "ce": the windows' own tokens
    layers, n_kv, head_dim = proj.shape
    frozen = torch.zeros(layers, n_kv, 2, dtype=torch.bool)
    if values_only:  # keys keep every dim
        frozen[..., 0] = True
        r0 = uniform_rate(head_dim, 2 * budget - 1, step)
    else:
        r0 = uniform_rate(head_dim, budget, step)

    def at(level: int) -> torch.Tensor:
        return torch.where(frozen, torch.tensor(head_dim), torch.tensor(level))

    levels = [r for r in (r0 - step, r0, r0 + step) if step <= r <= head_dim]
    advance = (progress or Silent()).task("rate search", len(levels) + evals)
    grads = {}
    for r in levels:
        grads[r] = mask_gradients(model, _proj_at(proj, at(r)), windows, reference)
        advance(1)
    costs = {lo: cut_cost(grads[lo], grads[lo + step], lo, step) for lo in levels if lo + step in grads}
    rates = at(r0)
    target = budget * 2 * layers * n_kv * head_dim
    if r0 in costs:  # top up to the budget: the units whose next block promises the largest KL drop
        free = int((target + 1e-9 - float(rates.sum())) // step)
        order = torch.argsort(costs[r0].masked_fill(frozen, float("-inf")).reshape(-1), descending=True)
        rates.view(-1)[order[: max(0, min(free, int((~frozen).sum())))]] += step
    best = score(model, _proj_at(proj, rates), windows, reference)
    start, tried, moves = best, 0, []
    rejected: set[tuple[int, int]] = set()
    while tried < evals:
        pairs = [p for p in candidate_swaps(rates, costs, step, frozen, evals) if (p[1], p[2]) not in rejected]
        if not pairs:
            break
        for _, giver, taker in pairs:
            trial = rates.clone()
            trial.view(-1)[giver] -= step
            trial.view(-1)[taker] += step
            kl = score(model, _proj_at(proj, trial), windows, reference)
            tried += 1
            advance(1)
            if kl < best:
                best, rates = kl, trial
                frozen.view(-1)[giver] = frozen.view(-1)[taker] = True
                moves.append((_unit(giver, n_kv), _unit(taker, n_kv)))
                break
            rejected.add((giver, taker))
            if tried >= evals:
                break
    _set_rates(model, rates[..., 0], rates[..., 1])
    return SearchResult(_proj_at(proj, rates), start, best, tried, moves)
