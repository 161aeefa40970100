"""Calibrate stage: stream token windows through the model layer by layer and sum x and x xᵀ of every layer's
attention input (float64). Several processes (torchrun / accelerate launch) split the windows and all-reduce."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvconvert.checkpoint import Checkpoint
from kvconvert.config import CalibrateConfig
from kvconvert.distributed import Part, all_reduce_sum, gather_rows
from kvconvert.errors import KVConvertError
from kvconvert.memory import release_memory
from kvconvert.modeling import load_model, load_tokenizer
from kvconvert.progress import Progress, Silent
from kvconvert.stats import CalibrationStats, StatsWriter, pack
from kvconvert.streaming import HiddenStore, LayerRunner
from kvconvert.textdata import SELF, iter_documents, sample_windows, token_windows, windows_digest


class _Captured(Exception):
    """Raised by the capture hook when the rest of the layer is not needed."""


def layer_pass(
    runner: LayerRunner, module, layer: int, hidden: torch.Tensor, need_output: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(attention input, layer output or None) of one decoder layer on `hidden`."""
    captured = {}

    def hook(_, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        if not need_output:
            raise _Captured

    attention = runner.ckpt.family.attention_module(module)
    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = runner.forward(module, layer, hidden)
    except _Captured:
        out = None
    finally:
        handle.remove()
    return captured["x"], out


def add_upper_gram(acc: torch.Tensor, x: torch.Tensor, blocks: int = 4) -> None:
    """acc += xᵀx on the upper-triangular column blocks only (what the packed statistics keep): 10/16 of the
    float64 work of the full product for 4 blocks. The lower blocks of `acc` are left untouched."""
    n = x.shape[1]
    edges = [n * i // blocks for i in range(blocks + 1)]
    for i in range(blocks):
        a, b = edges[i], edges[i + 1]
        acc[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])


HALF = (torch.bfloat16, torch.float16)
GRAM_CHUNK = 2048


def add_gram_tensor_cores(acc: torch.Tensor, x: torch.Tensor, chunk: int = GRAM_CHUNK) -> None:
    """acc (float64) += xᵀx for bf16/fp16 `x` on a GPU, on its tensor cores: each product of two half-precision
    values is exact in float32, each `chunk` rows are summed in float32, and the partial sums in float64.
    (The float64 product would cost about as much as the layer's own forward on an H100.)"""
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        try:
            acc += torch.mm(part.T, part, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without mm(out_dtype=): the float64 product
            add_upper_gram(acc, part.double())


LayerSink = Callable[[int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def accumulate(
    ckpt: Checkpoint,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    on_layer: LayerSink,
    offload_dir: Path | None = None,
    progress: Progress | None = None,
) -> None:
    """Sum x and x xᵀ (float64) of every layer's attention input over `windows` (n, seq_len), layer by layer.

    `on_layer(layer, sum_x (h,), packed sum_xx)` receives each layer's sums as soon as the layer is done.
    """
    geom = ckpt.family.geometry(ckpt.config)
    n_layers, hidden_size = geom.num_layers, geom.hidden_size
    acc_device = device if device.type == "cuda" else torch.device("cpu")
    runner = LayerRunner(ckpt, device, dtype)
    store_device = device if offload_dir is None else torch.device("cpu")
    store = HiddenStore((len(windows), windows.shape[1], hidden_size), dtype, store_device, offload_dir)
    advance = (progress or Silent()).task("calibrating (layers)", n_layers)
    try:
        batches = [(s, min(s + batch_size, len(windows))) for s in range(0, len(windows), batch_size)]
        runner.embed_into(store, windows, batches)
        for layer in range(n_layers):
            module = runner.load(layer)
            last = layer == n_layers - 1
            sum_x = torch.zeros(hidden_size, dtype=torch.float64, device=acc_device)
            sum_xx = torch.zeros(hidden_size, hidden_size, dtype=torch.float64, device=acc_device)
            for start, stop in batches:
                x, out = layer_pass(runner, module, layer, store.read(start, stop, device), need_output=not last)
                if out is not None:
                    store.write(start, out)
                x = x.reshape(-1, hidden_size)
                if x.is_cuda and x.dtype in HALF:
                    add_gram_tensor_cores(sum_xx, x)
                    sum_x += x.sum(0, dtype=torch.float64)
                else:
                    x = x.to(acc_device, torch.float64)
                    add_upper_gram(sum_xx, x)
                    sum_x += x.sum(0)
            del module
            runner.free(layer)
            on_layer(layer, sum_x, pack(sum_xx))
            del sum_xx
            release_memory()
            advance()
    finally:
        store.close()


def calibration_windows(
    ckpt: Checkpoint,
    text: CalibrateConfig,
    device: torch.device,
    dtype: torch.dtype,
    part: Part | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """All token windows (samples, seq_len) of `text`: from a dataset spec, or sampled from the model for `self`
    (each process samples its own batches, then they are shared). `device`/`dtype`: `text`'s, resolved."""
    part = part or Part()
    samples, seq_len = text.samples, text.seq_len
    tokenizer = load_tokenizer(ckpt)
    if text.dataset != SELF:
        return token_windows(tokenizer, iter_documents(text.dataset, text.text_field), samples, seq_len, text.dataset)
    model = load_model(ckpt, device, dtype)
    spans = part.batches(samples, text.batch_size)
    name = Path(str(ckpt.spec)).name or str(ckpt.spec)
    local = sample_windows(model, tokenizer, samples, seq_len, text.batch_size, text.seed, spans, progress, name)
    del model
    return gather_rows(local, spans, samples, part)


def calibrate(
    ckpt: Checkpoint,
    output: Path,
    text: CalibrateConfig,
    device: torch.device,
    dtype: torch.dtype,
    part: Part | None = None,
    progress: Progress | None = None,
    windows: torch.Tensor | None = None,
    timings: dict[str, float] | None = None,
) -> CalibrationStats | None:
    """Write the statistics of `text` (samples windows of seq_len tokens from dataset) to `output`, layer by layer.

    Under several processes (`part`), each handles its dealt batches, the sums are all-reduced per layer and the
    main process writes the file. Returns the (lazily read) statistics on the main process, None elsewhere.
    `windows`, when given, are the token windows already built from `text` (so callers can reuse them).
    `timings`, when given, receives the seconds of `text` (building the windows, when not given), `layers` (the
    layer pass, each layer's sums written as it ends) and `finish` (syncing the file and moving it into place).
    """
    part = part or Part()
    device = part.device or device
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    if windows is None:
        windows = calibration_windows(ckpt, text, device, dtype, part, progress)
        timings["text"] = time.perf_counter() - t0
    mine = part.batches(text.samples, text.batch_size)  # none when there are more processes than batches
    local = torch.cat([windows[s:e] for s, e in mine]) if mine else windows[:0]
    source = {
        **text.model_dump(include={"dataset", "samples", "seq_len", "seed", "text_field"}),
        **({"batch_size": text.batch_size} if text.dataset == SELF else {}),  # `self` samples are drawn per batch
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.device(device).type,  # `self` samples depend on it (CUDA and CPU draw other tokens)
        "tokens_sha256": windows_digest(windows),
    }
    geom = ckpt.family.geometry(ckpt.config)
    writer = None
    if part.is_main:
        writer = StatsWriter(output, geom.num_layers, geom.hidden_size, windows.numel(), ckpt.fingerprint(), source)

    def on_layer(layer: int, sum_x: torch.Tensor, packed: torch.Tensor) -> None:
        all_reduce_sum(sum_x, part)
        all_reduce_sum(packed, part)
        if not (torch.isfinite(sum_x).all() and torch.isfinite(packed).all()):
            raise KVConvertError(
                f"calibration sums of layer {layer} are NaN/Inf ({dtype} overflow?); use --dtype bfloat16 or float32"
            )
        if writer is not None:
            writer.add(layer, sum_x, packed)

    t0 = time.perf_counter()
    try:
        accumulate(ckpt, local, text.batch_size, device, dtype, on_layer, text.offload_dir, progress)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    timings["layers"] = time.perf_counter() - t0
    if writer is None:
        return None
    t0 = time.perf_counter()
    writer.close()
    stats = CalibrationStats.load(output)
    timings["finish"] = time.perf_counter() - t0
    return stats
