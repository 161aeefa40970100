"""Refine stage: fit each converted attention block to the original block's output, one layer at a time.

After the closed-form merge, layer by layer: cache the original attention block's inputs X and outputs Y on the
calibration windows, then optimise the converted q/k/v/o (shapes unchanged, so the checkpoint stays stock) with
Adam to minimise ||attn'(X') - Y||² / ||Y||². X' is X itself (`inputs="original"`) or the input the converted
model, with the layers before already refined, really sees (`inputs="sequential"`, as GPTQ does). No gradient
crosses layers; only one layer is in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kvconvert.calibrate import layer_pass
from kvconvert.config import RefineConfig, RefineInputs
from kvconvert.converted import Converted
from kvconvert.memory import release_memory
from kvconvert.progress import Progress, Silent
from kvconvert.streaming import HiddenStore, LayerRunner
from kvconvert.types import AttentionWeights

INPUTS = get_args(RefineInputs)
RefineOptions = RefineConfig
"""Former name: the refine stage takes `kvconvert.config.RefineConfig` (steps, lr relative to each tensor's RMS,
batch_size, inputs)."""


class _Capture:
    """Forward hook that records an attention block's input hidden states and output."""

    def __init__(self, attn: nn.Module):
        self.x = self.y = None
        self._h = attn.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        self.x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.y = output[0]

    def remove(self) -> None:
        self._h.remove()


def _call(attn: nn.Module, runner: LayerRunner, layer: int, x: torch.Tensor) -> torch.Tensor:
    ctx = runner.context(x, layer)
    extra = runner.ckpt.family.layer_kwargs
    return attn(
        hidden_states=x, position_embeddings=ctx["position_embeddings"], attention_mask=ctx["attention_mask"], **extra
    )[0]


@torch.no_grad()
def _error(attn: nn.Module, runner: LayerRunner, layer: int, xs: HiddenStore, ys: HiddenStore, spans) -> float:
    """||attn(X) - Y||² / ||Y||² over all windows."""
    num = den = 0.0
    for start, stop in spans:
        y = ys.read(start, stop, runner.device)
        num += float((_call(attn, runner, layer, xs.read(start, stop, runner.device)) - y).double().pow(2).sum())
        den += float(y.double().pow(2).sum())
    return num / max(den, 1e-30)


def _fit(attn: nn.Module, runner: LayerRunner, layer: int, xs: HiddenStore, ys: HiddenStore, opts: RefineOptions):
    """Adam on the normalised output error, cycling over the cached windows; each tensor's step size is
    opts.lr x its RMS, so one setting suits models whose weights differ in scale."""
    params = list(attn.parameters())
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": [p], "lr": opts.lr * float(p.detach().pow(2).mean().sqrt().clamp(min=1e-3))} for p in params]
    opt = torch.optim.Adam(groups)
    n = len(xs)
    spans = [(s, min(s + opts.batch_size, n)) for s in range(0, n, opts.batch_size)]
    for step in range(opts.steps):
        start, stop = spans[step % len(spans)]
        x, y = xs.read(start, stop, runner.device), ys.read(start, stop, runner.device)
        loss = (_call(attn, runner, layer, x) - y).pow(2).mean() / y.pow(2).mean().clamp(min=1e-12)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)


def refine(
    conv: Converted,
    windows: torch.Tensor,
    opts: RefineOptions,
    store: Path,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    offload_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[Converted, list[dict]]:
    """Refined conversion (its attention weights saved per layer under `store`) and per-layer fit records."""
    from transformers import AutoModelForCausalLM

    if opts.inputs not in INPUTS:
        raise ValueError(f"refine inputs must be one of {INPUTS}")
    ckpt = conv.ckpt
    runner = LayerRunner(ckpt, device, dtype)
    with torch.device("meta"):
        config = conv.config
        config._attn_implementation = runner.config._attn_implementation
        new_layers = AutoModelForCausalLM.from_config(config).get_submodule(ckpt.family.layers_path)
    fam = ckpt.family
    new_geom = fam.geometry(ckpt.config).with_kv_heads(conv.plan.num_kv_heads_after)
    attn_path = fam.attention
    store.mkdir(parents=True, exist_ok=True)
    shape = (len(windows), windows.shape[1], ckpt.config.hidden_size)
    sequential = opts.inputs == "sequential"
    hidden, x_orig, y_orig = (HiddenStore(shape, dtype, device, offload_dir) for _ in range(3))
    hidden_conv = HiddenStore(shape, dtype, device, offload_dir) if sequential else None
    x_conv = HiddenStore(shape, dtype, device, offload_dir) if sequential else None
    spans = [(s, min(s + opts.batch_size, len(windows))) for s in range(0, len(windows), opts.batch_size)]
    records = []
    advance = (progress or Silent()).task("refining (layers)", len(conv.plan.layers))
    try:
        runner.embed_into(hidden, windows, spans)
        if sequential:
            runner.embed_into(hidden_conv, windows, spans)
        for layer in range(len(conv.plan.layers)):
            module = runner.load(layer)
            original_attn = getattr(module, attn_path)
            with torch.no_grad():
                cap = _Capture(original_attn)
                for start, stop in spans:
                    out = runner.forward(module, layer, hidden.read(start, stop, device))
                    x_orig.write(start, cap.x)
                    y_orig.write(start, cap.y)
                    hidden.write(start, out)
                cap.remove()
                if sequential:
                    for start, stop in spans:
                        x_conv.write(
                            start, layer_pass(runner, module, layer, hidden_conv.read(start, stop, device), False)[0]
                        )
            attn = getattr(new_layers[layer], attn_path)
            init = fam.write(conv.attention(layer), new_geom)
            state = {k: v.to(device, dtype) for k, v in init.items()}
            # copies: the assigned tensors become the parameters, which Adam updates in place; `state` must stay
            # the closed-form weights for the revert below
            attn.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
            x_fit = x_conv if sequential else x_orig
            before = _error(attn, runner, layer, x_fit, y_orig, spans)
            _fit(attn, runner, layer, x_fit, y_orig, opts)
            after = _error(attn, runner, layer, x_fit, y_orig, spans)
            kept = after < before
            if not kept:  # never leave a layer worse than the closed-form merge
                attn.load_state_dict(state, strict=True, assign=True)
                after = before
            if sequential:
                with torch.no_grad():
                    setattr(module, attn_path, attn)
                    for start, stop in spans:
                        hidden_conv.write(start, runner.forward(module, layer, hidden_conv.read(start, stop, device)))
                    setattr(module, attn_path, original_attn)
            fitted = attn.state_dict()
            tensors = {k: fitted[k].detach().to("cpu", v.dtype).contiguous() for k, v in init.items()}
            save_file(tensors, str(store / f"layer-{layer}.safetensors"))
            records.append(
                {"layer": layer, "error_before": round(before, 6), "error_after": round(after, 6), "kept": kept}
            )
            attn.to_empty(device="meta")
            runner.free(layer)
            release_memory()
            advance()
    finally:
        for s in (hidden, x_orig, y_orig, hidden_conv, x_conv):
            if s is not None:
                s.close()

    def overrides(layer: int) -> AttentionWeights:
        return fam.read(load_file(str(store / f"layer-{layer}.safetensors")), new_geom)

    return Converted(ckpt, conv.plan, overrides), records
