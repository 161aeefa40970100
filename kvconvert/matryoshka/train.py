"""Matryoshka training: distil the frozen model into itself through its orthogonal cuts, with random per-head rates.

Each step samples a key rate and a value rate for every (layer, KV head) from the allowed levels, runs the model
through the masked MatryoshkaKV attention, and minimises KL(original ‖ cut) (+ optional CE) with the model weights
frozen; only the Cayley skew parameters of the bases train, so the bases stay exactly orthogonal (to round-off).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvconvert.heal.data import window_order
from kvconvert.heal.objective import Objective
from kvconvert.matryoshka.projections import Projections
from kvconvert.progress import Progress, Silent
from kvconvert.runtime.matryoshka import MatryoshkaRuntime
from kvconvert.runtime.matryoshka_attention import HeadProjections, attention_modules


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 2
    lr: float = 1e-3
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    seed: int = 0
    min_fraction: float = 0.125  # lowest sampled rate, as a share of head_dim
    values_only: bool = False  # keys stay at full rate (a cut that folds into a stock checkpoint)


@dataclass(frozen=True)
class TrainResult:
    projections: Projections
    losses: list[float]
    tokens: int
    seconds: float


def rate_levels(head_dim: int, step: int, min_fraction: float = 0.0) -> torch.Tensor:
    """Allowed kept dims: multiples of `step` from max(step, min_fraction·D) to D."""
    levels = torch.arange(step, head_dim + 1, step)
    return levels[levels >= min_fraction * head_dim] if (levels >= min_fraction * head_dim).any() else levels


def current_projections(model, template: Projections) -> Projections:
    """The bases now held by the model's attention modules (after training), with `template`'s rates."""
    with torch.no_grad():
        pairs = [m.matryoshka.bases() for m in attention_modules(model)]
    return template.with_bases(torch.stack([k.cpu() for k, _ in pairs]), torch.stack([v.cpu() for _, v in pairs]))


def train_projections(
    model,
    init: Projections,
    windows: torch.Tensor,
    cfg: TrainConfig,
    step: int,
    accelerator=None,
    progress: Progress | None = None,
    on_step=None,
) -> TrainResult:
    """Train the bases of `init` on `windows` (n, T); returns the trained bases (rates of `init` kept)."""
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=next(model.parameters()).device.type == "cpu")
    model.requires_grad_(False)
    MatryoshkaRuntime(init).attach(model)
    heads: list[HeadProjections] = [m.matryoshka for m in attention_modules(model)]
    params = [p for h in heads for p in h.make_trainable()]
    optimizer = accelerator.prepare(torch.optim.Adam(params, lr=cfg.lr))
    objective = Objective(kl_weight=cfg.kl_weight, ce_weight=cfg.ce_weight)
    layers, n_kv, head_dim = init.shape
    levels = rate_levels(head_dim, step, cfg.min_fraction)
    gen = torch.Generator().manual_seed(cfg.seed)
    # the model's own device: `--device cuda:N` loads it on GPU N, while a single-process Accelerator says cuda:0
    device = next(model.parameters()).device
    advance = (progress or Silent()).task("matryoshka training", cfg.steps)
    losses, start = [], time.perf_counter()
    for s in range(cfg.steps):
        batch = windows[window_order(len(windows), s, cfg.batch_size, cfg.seed)].to(device)
        with torch.no_grad():
            for h in heads:
                h.enabled = False
            teacher = model(input_ids=batch, use_cache=False).logits if objective.needs_teacher else None
        picks = levels[torch.randint(len(levels), (layers, n_kv, 2), generator=gen)]
        if cfg.values_only:
            picks[..., 0] = head_dim
        for i, h in enumerate(heads):
            h.enabled = True
            h.set_rates(picks[i, :, 0], picks[i, :, 1])
        loss, _ = objective(model(input_ids=batch, use_cache=False).logits, teacher, batch)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        losses.append(float(loss.detach()))
        advance(1)
        if on_step is not None:
            on_step(s, heads)
    trained = current_projections(model, init)
    MatryoshkaRuntime(trained).attach(model)  # plain buffers again, at the trained bases and `init`'s rates
    return TrainResult(trained, losses, cfg.steps * cfg.batch_size * windows.shape[1], time.perf_counter() - start)
