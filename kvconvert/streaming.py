"""Run a checkpoint one decoder layer at a time: each layer is loaded from its shards, used, and freed, while the
next one is read from disk on a thread (`LayerRunner(prefetch=True)`, the default).

The hidden states of all calibration windows stay between layers (on the device, in host memory, or in a
disk-backed file when they do not fit), so peak memory is about two layers' weights (the one in use and the one
read ahead, in host memory) plus those hidden states.
"""

from __future__ import annotations

import copy
import inspect
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import nn

from kvconvert.checkpoint import Checkpoint
from kvconvert.compat import cache_kwargs


class HiddenStore:
    """Hidden states (n, seq_len, hidden) of every window: a tensor in memory, or a temporary file on disk.

    The file is read and written with pread/pwrite (not mapped), so spilled states live in the page cache, which
    the kernel may drop, rather than in the process's resident memory.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, disk: Path | None):
        self.shape, self.dtype = shape, dtype
        self.data, self._fd = None, None
        if disk is None:
            self.data = torch.empty(shape, dtype=dtype, device=device)
            return
        disk.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=disk, prefix="hidden-", suffix=".bin")
        os.unlink(name)  # anonymous: removed by the OS when closed, even after a crash
        self._fd = fd
        self._row = shape[1] * shape[2] * torch.empty((), dtype=dtype).element_size()

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        if self._fd is None:
            return self.data[start:stop].to(device)
        buf = bytearray(self._row * (stop - start))
        os.preadv(self._fd, [buf], self._row * start)
        return torch.frombuffer(buf, dtype=self.dtype).view(stop - start, *self.shape[1:]).to(device)

    def write(self, start: int, values: torch.Tensor) -> None:
        if self._fd is None:
            self.data[start : start + len(values)] = values.to(self.data.device)
            return
        raw = values.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy()
        os.pwrite(self._fd, memoryview(raw).cast("B"), self._row * start)

    def close(self) -> None:
        self.data = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LayerRunner:
    """Embeds token windows and applies the checkpoint's decoder layers one at a time, as transformers would."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, prefetch: bool = True):
        """`prefetch`: read the next layer while the current one runs (two layers' weights in host memory)."""
        from transformers import AutoModelForCausalLM

        self.ckpt, self.device, self.dtype, self.prefetch = ckpt, device, dtype, prefetch
        self._ahead: dict[int, Future] = {}
        config = copy.deepcopy(ckpt.config)
        self.config = config
        for impl in ("sdpa", "eager"):  # eager where a family needs it (Gemma 2's attention soft-capping)
            config._attn_implementation = impl
            try:
                with torch.device("meta"):
                    skeleton = AutoModelForCausalLM.from_config(config)
                break
            except ValueError:
                if impl == "eager":
                    raise
        self.base = skeleton.base_model
        self.layers = skeleton.get_submodule(ckpt.family.layers_path)
        self.rotary = type(self.base.rotary_emb)(config=config).to(device)
        self._typed_rotary = "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters
        self._prefix = ckpt.family.layers_path + "."
        embed = self.base.get_input_embeddings()
        # Gemma scales its embeddings inside the embedding module, Granite in the model's forward
        self.embed_scale = float(getattr(embed, "scalar_embed_scale", getattr(config, "embedding_multiplier", 1.0)))

    def embed_into(self, store: HiddenStore, windows: torch.Tensor, batches: list[tuple[int, int]]) -> None:
        """Input embeddings of every window into `store` (gathered in the stored dtype, kept in the compute dtype)."""
        weight = self.ckpt.tensors.get(self.ckpt.family.embed_name).to(self.device)
        for start, stop in batches:
            x = nn.functional.embedding(windows[start:stop].to(self.device), weight)
            if self.embed_scale != 1.0:
                x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
            store.write(start, x.to(self.dtype))

    def read(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer `layer`'s tensors as stored (names with the layer prefix), read into memory in the compute dtype."""
        prefix = f"{self._prefix}{layer}."
        names = [n for n in self.ckpt.tensors.names() if n.startswith(prefix)]
        return {n: self.ckpt.tensors.get(n).to(dtype=self.dtype, copy=True) for n in names}

    def read_ahead(self, layer: int) -> None:
        """Start reading layer `layer` on a background thread (once; a layer out of range is ignored)."""
        if 0 <= layer < len(self.layers) and layer not in self._ahead:
            self._ahead[layer] = read_in_background(self.read, layer)

    def load(self, layer: int) -> nn.Module:
        """Decoder layer `layer` with its weights, on the device, in the compute dtype. With `prefetch`, the next
        layer is read from disk while this one works (the reads then overlap the computation)."""
        module = self.layers[layer]
        prefix = f"{self._prefix}{layer}."
        ahead = self._ahead.pop(layer, None)
        stored = ahead.result() if ahead is not None else self.read(layer)
        if self.prefetch:
            self.read_ahead(layer + 1)
        state = {n[len(prefix) :]: t.to(self.device) for n, t in stored.items()}
        del stored
        if set(state) != set(module.state_dict()):  # stored in another format (MoE experts): let transformers convert
            state = converted_layer_state(self.config, layer, state, prefix)
            state = {n: t.to(self.device, self.dtype) for n, t in state.items()}
        module.load_state_dict(state, strict=True, assign=True)  # the loaded tensors become the parameters
        return module.eval()

    def free(self, layer: int) -> None:
        self.layers[layer].to_empty(device="meta")
        for stale in [i for i in self._ahead if i <= layer]:  # read ahead but never loaded
            del self._ahead[stale]

    def context(self, hidden: torch.Tensor, layer: int) -> dict:
        """Keyword arguments a decoder layer needs for a batch of full windows (no padding)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        positions = torch.arange(hidden.shape[1], device=self.device).unsqueeze(0)
        kinds = getattr(self.config, "layer_types", None)
        sliding = kinds[layer] == "sliding_attention" if kinds else bool(getattr(self.config, "sliding_window", None))
        make_mask = create_sliding_window_causal_mask if sliding else create_causal_mask
        rotary = self.rotary(hidden, positions, kinds[layer]) if self._typed_rotary else self.rotary(hidden, positions)
        mask = make_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            **cache_kwargs(None),
            position_ids=positions,
        )
        return {
            "attention_mask": mask,
            "position_ids": positions,
            "position_embeddings": rotary,
        }

    @torch.no_grad()
    def forward(self, module: nn.Module, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        out = module(hidden, **self.context(hidden, layer), **self.ckpt.family.layer_kwargs)
        return out[0] if isinstance(out, tuple) else out  # Falcon's layers return (hidden, ...)


def read_in_background(read: Callable[[int], dict[str, torch.Tensor]], layer: int) -> Future:
    """`read(layer)` on a thread; its result (or error) in the returned future. Reading tensors is page faults and
    copies, which release the GIL, so it overlaps the caller's computation. Not a daemon: a process that exits
    (an error, Ctrl-C) while a daemon thread is inside torch aborts ("terminate called without an active
    exception", exit 134) instead of exiting with its own code; this one is waited for, one layer's read."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(read(layer))
        except BaseException as exc:  # handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=work, name=f"kvconvert-read-layer-{layer}").start()
    return future


def converted_layer_state(config, layer: int, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One decoder layer's state as its module holds it, from tensors in checkpoint format (e.g. MoE experts stored
    one module per expert, held fused): a one-layer model is loaded by transformers, which applies its own
    conversions. Costs one temporary file of the layer."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    if getattr(one, "layer_types", None):
        one.layer_types = [one.layer_types[layer]]
    one.tie_word_embeddings = True
    inner = prefix.rsplit(".", 2)[0] + ".0."
    with tempfile.TemporaryDirectory() as tmp:
        one.save_pretrained(tmp)
        save_file({inner + n: t.contiguous().cpu() for n, t in state.items()}, f"{tmp}/model.safetensors")
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=next(iter(state.values())).dtype)
    return {n: t.detach() for n, t in model.get_submodule(inner.rstrip(".")).state_dict().items()}
