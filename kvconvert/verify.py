"""Verify stage: check a written checkpoint against the in-memory conversion before it replaces anything.

The default check streams, so it fits the same memory budget as the export: every written tensor is compared
exactly with the in-memory conversion, one layer at a time; then a few tokens of logits are computed layer by layer
(`streaming.LayerRunner`) from the written config and tensors and from the in-memory conversion, and compared.
`verify` (opt-in, `--reload-check`) is the whole-model check: a stock `from_pretrained` reload of the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from kvconvert.checkpoint import Checkpoint
from kvconvert.converted import Converted
from kvconvert.errors import KVConvertError, first_line
from kvconvert.export import TensorSource, output_specs
from kvconvert.io.shards import spec_of
from kvconvert.memory import release_memory
from kvconvert.streaming import HiddenStore, LayerRunner

HEAD_ROWS = 8192
"""Rows of the output head multiplied at a time (keeps the head's fp32 copy small)."""


@dataclass(frozen=True)
class VerifyResult:
    max_abs_diff: float
    logits_scale: float
    tokens: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= 1e-4 * max(self.logits_scale, 1.0)


def check_tensors(written: Checkpoint, conv: Converted) -> int:
    """Every written tensor equals the in-memory conversion exactly (names, dtypes, shapes, values); returns count."""
    specs = output_specs(conv)
    reader = written.tensors
    if sorted(reader.names()) != sorted(specs):
        extra = sorted(set(reader.names()) ^ set(specs))
        raise KVConvertError(f"written checkpoint has other tensors than the conversion ({extra[:3]}); please report")
    want = TensorSource(conv)
    for name in sorted(specs, key=_layer_order(conv)):
        got, ref = reader.get(name), want(name)
        if spec_of(got) != spec_of(ref) or not torch.equal(got, ref):
            raise KVConvertError(f"written {name} differs from the in-memory conversion; please report this")
    release_memory()
    return len(specs)


def _layer_order(conv: Converted):
    index = TensorSource(conv).attn
    return lambda name: (index.get(name, -1), name)


class _ConvertedTensors:
    """The in-memory conversion seen as a tensor reader (folded attention, other tensors from the source)."""

    def __init__(self, conv: Converted):
        self._source, self._reader = TensorSource(conv), conv.ckpt.tensors
        self._layer: tuple[int, object] | None = None

    def names(self) -> list[str]:
        return self._reader.names()

    def __contains__(self, name: str) -> bool:
        return name in self._reader

    def get(self, name: str) -> torch.Tensor:
        if name not in self._source.attn:
            return self._reader.get(name)
        layer = self._source.attn[name]
        if self._layer is None or self._layer[0] != layer:
            self._layer = (layer, self._source.layer(layer))
        return self._layer[1][name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)[start:stop] if name in self._source.attn else self._reader.rows(name, start, stop)

    def shape(self, name: str) -> list[int]:
        return self._reader.shape(name) if name not in self._source.attn else list(self.get(name).shape)


def in_memory_view(conv: Converted):
    """A checkpoint-like object (config, family, tensors) for the conversion, readable layer by layer."""
    return SimpleNamespace(config=conv.config, family=conv.ckpt.family, tensors=_ConvertedTensors(conv))


@torch.no_grad()
def layerwise_logits(ckpt, ids: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32):
    """Logits of `ids` (1, n) computed one decoder layer at a time; inputs go to `device`, logits come back on CPU."""
    runner = LayerRunner(ckpt, device, dtype)
    fam, reader = ckpt.family, ckpt.tensors
    store = HiddenStore((ids.shape[0], ids.shape[1], ckpt.config.hidden_size), dtype, device, None)
    runner.embed_into(store, ids, [(0, ids.shape[0])])
    hidden = store.read(0, ids.shape[0], device)
    store.close()
    for layer in range(len(runner.layers)):
        out = runner.forward(runner.load(layer), layer, hidden)
        hidden = out[0] if isinstance(out, tuple) else out
        runner.free(layer)
        release_memory()
    norm = getattr(runner.base, "norm", None)
    if norm is not None:
        prefix = fam.layers_path.rsplit(".", 1)[0] + ".norm."
        state = {n[len(prefix) :]: reader.get(n).to(device, dtype) for n in reader.names() if n.startswith(prefix)}
        norm.load_state_dict(state, strict=True, assign=True)
        hidden = norm(hidden)
    head = fam.lm_head_name if fam.lm_head_name in reader else fam.embed_name
    rows = reader.shape(head)[0]
    parts = []
    for start in range(0, rows, HEAD_ROWS):
        w = reader.rows(head, start, min(start + HEAD_ROWS, rows)).to(device, dtype)
        parts.append((hidden @ w.T).cpu())
    return torch.cat(parts, dim=-1)


def verify_streamed(
    directory: Path, conv: Converted, device: torch.device | str = "cpu", tokens: int = 16, seed: int = 0
) -> VerifyResult:
    """Check the checkpoint written to `directory` against `conv`: tensors exactly, then logits layer by layer."""
    device = torch.device(device)
    written = Checkpoint(Path(directory), str(directory), trust_remote_code=conv.ckpt.trust_remote_code)
    check_tensors(written, conv)
    vocab = conv.config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
    want = layerwise_logits(in_memory_view(conv), ids, device)
    try:
        got = layerwise_logits(written, ids, device)
    except (RuntimeError, ValueError) as exc:
        msg = f"the written checkpoint does not run with its own config ({first_line(exc)}); please report this"
        raise KVConvertError(msg) from exc
    if got.shape != want.shape:
        raise KVConvertError(f"written checkpoint gives logits of shape {list(got.shape)}, not {list(want.shape)}")
    return VerifyResult(float((got - want).abs().max()), float(want.abs().max()), tokens)


def converted_in_memory(conv: Converted, dtype: torch.dtype = torch.float32):
    """The converted model built in memory (new config + final tensors), without touching the output files."""
    from transformers import AutoModelForCausalLM

    ckpt = conv.ckpt
    model = AutoModelForCausalLM.from_config(conv.config, dtype=dtype)
    state = {name: ckpt.tensors.get(name) for name in ckpt.tensors.names()}
    source = TensorSource(conv)
    for layer in range(len(conv.plan.layers)):
        state.update(source.layer(layer))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise KVConvertError(f"converted tensors do not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def verify(output: Path, reference, tokens: int = 16, seed: int = 0, trust_remote_code: bool = False) -> VerifyResult:
    """Whole-model check: logits of the stock-reloaded `output` against the model `reference`, wherever it lives.

    Each model gets its inputs on its own device (the reference may be on a GPU, the reload is on the CPU).
    """
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(
        output, dtype=torch.float32, trust_remote_code=trust_remote_code
    ).eval()
    vocab = reference.config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
    ref = reference.float()
    want = ref(ids.to(_device_of(ref))).logits.cpu()
    got = reloaded(ids.to(_device_of(reloaded))).logits.cpu()
    return VerifyResult(float((got - want).abs().max()), float(want.abs().max()), tokens)
