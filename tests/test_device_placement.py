"""Device placement found by a static audit, checked on a CPU-only machine.

The GPU stand-in is torch's "meta" device: a model built there computes shapes only, and torch lets many ops mix
meta and CPU tensors silently (an embedding of CPU ids with a meta weight gives a meta result), where CUDA would
raise "Expected all tensors to be on the same device". `one_device()` makes such a mix an error, so a function that
leaves inputs on the CPU while the model is elsewhere fails here as it would on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import kvconvert.runtime as runtime
from tests.tiny import DEVICES, make_model

# Ops that legitimately take tensors of two devices (copies, and CPU index tensors into device tensors).
_CROSS_DEVICE_OK = {"to", "copy_", "__getitem__", "__setitem__", "cpu", "cuda", "_to_copy"}


class one_device(TorchFunctionMode):
    """Raise if one torch call gets (non-scalar) tensors of more than one device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name not in _CROSS_DEVICE_OK:
            leaves, _ = tree_flatten((args, kwargs))
            devices = {t.device.type for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0}
            if len(devices) > 1:
                raise AssertionError(f"{name} mixes devices {sorted(devices)}")
        return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def _masks_without_data(monkeypatch):
    """transformers' mask builders skip work by looking at mask values (`.all()`), which meta tensors do not have;
    when tracing they do not look, so a meta forward pass is treated as one."""
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "is_tracing", lambda *a, **k: True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("found-dev"), "llama", heads=4, kv_heads=2, head_dim=16, layers=2)


def meta_model(path):
    """The tiny model's architecture on the meta device (the stand-in for a GPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def test_checker_catches_cpu_ids_fed_to_a_meta_model(tiny):
    """The stand-in works: CPU ids into a meta model are caught; meta ids pass."""
    model = meta_model(tiny)
    with torch.no_grad(), one_device():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"), use_cache=False)
        with pytest.raises(AssertionError, match="mixes devices"):
            model(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)


# --- eval --cache: evaluation/longcontext.py, evaluation/cached.py --------------------------------------------


def test_prefill_and_greedy_put_cpu_ids_on_the_model_device(tiny):
    """`kvconvert eval MODEL --cache ... --device cuda`: windows, passkey prompts and decode ids are built on the
    CPU; prefill/greedy fed them to the model as they were."""
    from transformers import DynamicCache

    from kvconvert.evaluation.longcontext import ask_passkey, continuation_logits, greedy, prefill

    model = meta_model(tiny)
    ids = torch.randint(5, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    question = ids[:, :3].clone()
    with one_device():
        assert prefill(model, ids, DynamicCache(config=model.config), 4).device.type == "meta"
        assert continuation_logits(model, ids, DynamicCache(config=model.config), 4, prompt=6).device.type == "meta"
        assert greedy(model, ids, DynamicCache(config=model.config), 0, 2, then=question).device.type == "meta"
        ask_passkey(model, ids, question, DynamicCache(config=model.config), 0, 2)


def test_nll_scores_device_logits_against_cpu_windows():
    """`nll(logits on the device, windows on the CPU)`, as evaluate_cache calls it."""
    from kvconvert.evaluation.longcontext import nll

    logits = torch.zeros(1, 6, 10, device="meta")
    ids = torch.zeros(1, 6, dtype=torch.long)
    # float() of a meta loss is as far as a meta tensor goes: reaching it means the placement check passed
    with one_device(), pytest.raises(RuntimeError, match="meta tensors"):
        nll(logits, ids, 2)


class FullCache:
    """A runtime serving the full cache under another name: only evaluate_cache's own placement and timing are
    under test."""

    def attach(self, model):
        pass

    def new_cache(self, model, batch=1):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def kv_bytes(self, tokens, batch=1):
        return 0


def test_eval_cache_decode_ids_go_to_the_model_device(tiny, monkeypatch):
    """evaluate_cache's decode timing fed `torch.randint(...)` CPU ids to the model (after a prefill of them)."""
    from kvconvert.evaluation import cached

    model = meta_model(tiny)
    fed = []
    real_forward = model.forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        fed.append(ids.device.type)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)

    monkeypatch.setattr(runtime, "runtime_for", lambda spec, m: FullCache())
    monkeypatch.setattr(cached, "nll", lambda logits, ids, skip: (1.0, 1))
    monkeypatch.setattr(cached, "passkey_parts", lambda tok, ctx, depth, key: (torch.ones(1, 8, dtype=torch.long),) * 2)
    tok = SimpleNamespace(decode=lambda ids: "")
    windows = torch.ones(1, 8, dtype=torch.long)
    cached.evaluate_cache(model, tok, "other", windows, [16], chunk=8, new_tokens=2)
    assert fed and set(fed) == {"meta"}, fed


@pytest.mark.parametrize("device", DEVICES)
def test_eval_cache_runs_on_every_device(tiny, tmp_path, device):
    """The whole `eval --cache razor:PROFILE` evaluation with the model on `device` (CPU windows, as run_eval_cache
    builds them)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvconvert.evaluation.cached import evaluate_cache
    from kvconvert.razor.store import SCHEMA

    profile = tmp_path / "p.json"
    rule = {"sinks": 2, "window_floor": 16, "window_fraction": 0.0, "compensation": True}
    profile.write_text(json.dumps({"schema": SCHEMA, "retrieval": [[0], [1]], "runtime": rule}))
    model = AutoModelForCausalLM.from_pretrained(tiny).eval().to(device)
    tok = AutoTokenizer.from_pretrained(tiny)
    windows = torch.randint(5, 300, (1, 48), generator=torch.Generator().manual_seed(0))
    report = evaluate_cache(model, tok, f"razor:{profile}", windows, [80], chunk=16, new_tokens=2, prompt_fraction=0.5)
    assert set(report["methods"]) == {"full", f"razor:{profile}"}


# --- matryoshka --values-only --fold-values: matryoshka/fold.py -----------------------------------------------


def test_fold_value_cut_works_where_the_model_is(tiny):
    """`kvconvert matryoshka MODEL --values-only --fold-values --device cuda`: the projections are CPU tensors
    (moments, PCA and training results are brought to the CPU) while v_proj is on the GPU; the fold mixed them."""
    from kvconvert.matryoshka.fold import fold_value_cut
    from kvconvert.matryoshka.projections import Projections, full_rates

    model = meta_model(tiny)
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(2, 2, 16, 16, generator=g))[0]
    proj = Projections(basis, basis.clone(), full_rates(2, 2, 16), torch.full((2, 2), 8, dtype=torch.long))
    with one_device():
        fold_value_cut(model, proj)


# --- matryoshka training: matryoshka/train.py -------------------------------------------------------------------


def test_matryoshka_training_batches_go_to_the_model_device(tiny):
    """`kvconvert matryoshka MODEL --device cuda:1`: the model is on cuda:1 but a single-process Accelerator's
    device is cuda:0, and the batches went there. Here the accelerator reports "meta" while the model is on the
    CPU: the batches must follow the model."""
    from transformers import AutoModelForCausalLM

    from kvconvert.matryoshka.projections import Projections, full_rates
    from kvconvert.matryoshka.train import TrainConfig, train_projections

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(2, 2, 16, 16, generator=g))[0]
    init = Projections(basis, basis.clone(), full_rates(2, 2, 16), full_rates(2, 2, 16))
    accelerator = SimpleNamespace(
        device=torch.device("meta"), prepare=lambda opt: opt, backward=lambda loss: loss.backward()
    )
    windows = torch.randint(5, 300, (4, 12), generator=torch.Generator().manual_seed(1))
    with one_device():
        res = train_projections(model, init, windows, TrainConfig(steps=2, batch_size=2), 4, accelerator=accelerator)
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))


# --- refine: the "never worse than the closed form" revert (refine.py) ------------------------------------------


def test_refine_revert_restores_the_closed_form_weights(tmp_path, tiny):
    """`compress --refine-steps N`: when the fit ends worse than the closed-form merge the layer is "reverted" by
    reloading `state`, but `state` was assigned as the parameters and Adam had updated it in place: the worse
    weights were written while the record says kept=False. A huge step size makes every fit worse."""
    from safetensors.torch import load_file

    from kvconvert.checkpoint import resolve
    from kvconvert.config import RefineConfig
    from kvconvert.converted import Converted
    from kvconvert.decompose import decompose
    from kvconvert.refine import refine
    from kvconvert.stats import CalibrationStats, pack

    ckpt = resolve(str(tiny))
    hidden, layers = ckpt.config.hidden_size, ckpt.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, hidden, generator=gen, dtype=torch.float64) for _ in range(layers)]
    stats = CalibrationStats(torch.stack([x.sum(0) for x in xs]), [pack(x.T @ x) for x in xs], 64, ckpt.fingerprint())
    geom = ckpt.family.geometry(ckpt.config)
    plan = decompose(stats.moments, ckpt.attention, geom, 1)
    conv = Converted(ckpt, plan)
    windows = torch.randint(5, 300, (4, 16), generator=torch.Generator().manual_seed(2))
    opts = RefineConfig(steps=3, lr=50.0, samples=4)
    _, records = refine(conv, windows, opts, tmp_path / "refined", torch.device("cpu"))
    reverted = [r["layer"] for r in records if not r["kept"]]
    assert reverted, records  # the huge step size made at least one layer worse
    new_geom = geom.with_kv_heads(1)
    for layer in reverted:
        want = ckpt.family.write(conv.attention(layer), new_geom)
        got = load_file(str(tmp_path / "refined" / f"layer-{layer}.safetensors"))
        for name, t in want.items():
            assert torch.equal(got[name], t.to(got[name].dtype)), (layer, name)


def test_eval_cache_decode_timing_waits_for_the_device(tiny, monkeypatch):
    """`eval --cache ... --contexts N` on CUDA timed the decode loop without a synchronize: kernel launches are
    asynchronous, so the clock could stop before the steps ran (decode tok/s overstated). The clock now reads
    after a sync on the model's device, before and after the loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvconvert.evaluation import cached

    events = []
    monkeypatch.setattr(cached, "synchronize", lambda device: events.append(("sync", torch.device(device).type)))
    real = cached.time.perf_counter
    monkeypatch.setattr(cached.time, "perf_counter", lambda: events.append(("clock", None)) or real())
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    windows = torch.randint(5, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(runtime, "runtime_for", lambda spec, m: FullCache())
    cached.evaluate_cache(model, tok, "other", windows, [40], chunk=16, new_tokens=2)
    clocks = [i for i, e in enumerate(events) if e[0] == "clock"]
    assert clocks, events
    for i in clocks:  # every clock reading right after a sync on the model's device
        assert i > 0 and events[i - 1] == ("sync", "cpu"), events
