"""Decompose overlapped with export: same bytes as planning first, layers planned in the writer's order, and
errors on either side stop both without leaving anything behind."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from kvconvert import decompose as decompose_module
from kvconvert.card import CARD, model_card
from kvconvert.checkpoint import resolve
from kvconvert.converted import Converted
from kvconvert.decompose import decompose
from kvconvert.export import layers_in_write_order, write_checkpoint
from kvconvert.families import AttentionGeometry
from kvconvert.overlap import Cancelled, PendingPlan
from kvconvert.pipeline import CalibrationRequest, CompressRequest, conversion_record, plan_compression, run_compress
from kvconvert.plan import CompressionPlan, LayerPlan
from kvconvert.record import RECORD, dump_record
from kvconvert.stats import CalibrationStats, pack
from tests.test_merge import layer_with_copies, moments
from tests.tiny import make_model

CPU = torch.device("cpu")
LAYERS = 12  # enough for the writer's name order (0, 1, 10, 11, 2, ...) to differ from 0, 1, 2, ...


@pytest.fixture(scope="module")
def twelve_layers(tmp_path_factory):
    """A 12-layer tiny Llama and statistics of random inputs for it (no text pipeline needed)."""
    root = tmp_path_factory.mktemp("overlap")
    src = make_model(root / "model", "llama", heads=4, kv_heads=4, head_dim=8, layers=LAYERS)
    ckpt = resolve(str(src))
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(48, ckpt.config.hidden_size, generator=gen, dtype=torch.float64) for _ in range(LAYERS)]
    stats = CalibrationStats(torch.stack([x.sum(0) for x in xs]), [pack(x.T @ x) for x in xs], 48, ckpt.fingerprint())
    stats.save(root / "stats.safetensors")
    return root, src


def _compress(src, stats, out, **kw) -> object:
    req = CompressRequest(model=str(src), heads="2", output=out, stats=stats, **kw)
    req.calibration = CalibrationRequest(device="cpu")
    return run_compress(req)


def test_overlapped_export_writes_the_bytes_of_planning_first(twelve_layers):
    """`compress` (decompose and export at once) writes exactly the files of planning every layer, then writing."""
    root, src = twelve_layers
    result = _compress(src, root / "stats.safetensors", root / "overlapped")
    assert "decompose+export" in result.timings and result.verify is not None and result.verify.ok

    ckpt = resolve(str(src))
    stats = CalibrationStats.load(root / "stats.safetensors")
    plan = plan_compression(ckpt, stats, 2, "weighted", "search", CPU)
    record = conversion_record(ckpt, plan, stats)
    extra = {RECORD: dump_record(record), CARD: model_card(record)}
    write_checkpoint(Converted(ckpt, plan), root / "sequential", extra_files=extra)

    names = sorted(p.name for p in (root / "sequential").iterdir())
    assert names == sorted(p.name for p in (root / "overlapped").iterdir())
    for name in names:
        assert (root / "overlapped" / name).read_bytes() == (root / "sequential" / name).read_bytes(), name


def test_layers_are_planned_in_the_order_the_writer_needs_them(twelve_layers, monkeypatch):
    """`layers_in_write_order` is the order in which writing the checkpoint first asks for each layer."""
    root, src = twelve_layers
    ckpt = resolve(str(src))
    plan = plan_compression(ckpt, CalibrationStats.load(root / "stats.safetensors"), 2, "weighted", "search", CPU)
    asked: list[int] = []
    real = Converted.attention

    def spy(self, layer):
        asked.append(layer)
        return real(self, layer)

    monkeypatch.setattr(Converted, "attention", spy)
    write_checkpoint(Converted(ckpt, plan), root / "spied", extra_files={}, max_shard_size="20KB")
    order = layers_in_write_order(ckpt, 2, "20KB")
    assert order == list(dict.fromkeys(asked))
    assert sorted(order) == list(range(LAYERS)) and order[:5] == [0, 1, 10, 11, 2]


def test_decompose_starts_layers_in_the_given_order_with_the_same_plans():
    geom = AttentionGeometry(64, 4, 8, 8, 16, 8)
    weights = [layer_with_copies(geom, [0, 1, 2, 1, 3, 0, 3, 2], biases=False) for _ in range(4)]
    stats = [moments(64, 300, seed=i) for i in range(4)]
    started: list[int] = []

    def moments_of(layer):
        started.append(layer)
        return stats[layer]

    plain = decompose(stats.__getitem__, weights.__getitem__, geom, 4)
    reordered = decompose(moments_of, weights.__getitem__, geom, 4, order=[2, 0, 3, 1])
    assert started == [2, 0, 3, 1]
    for a, b in zip(plain.layers, reordered.layers, strict=True):
        assert [h.kv_heads for h in a.heads] == [h.kv_heads for h in b.heads]
    with pytest.raises(ValueError, match="each of the 4 layers once"):
        decompose(stats.__getitem__, weights.__getitem__, geom, 4, order=[0, 1, 1, 2])


def _plan(layers: list[LayerPlan]) -> CompressionPlan:
    return CompressionPlan("weighted", "search", 2, 1, tuple(layers))


def test_a_layer_is_handed_over_before_the_rest_of_the_plan_is_done():
    first, second = LayerPlan(()), LayerPlan(())
    gate, finished = threading.Event(), threading.Event()

    def planner(on_layer):
        on_layer(0, first)
        gate.wait(10)
        on_layer(1, second)
        finished.set()
        return _plan([first, second])

    with PendingPlan(planner, 2, 1) as pending:
        assert pending.layer(0) is first
        assert not finished.is_set()  # layer 0 came while layer 1 was still being planned
        gate.set()
        assert pending.layer(1) is second
        assert pending.result().layers == (first, second)


def test_a_planning_error_reaches_the_writer():
    def planner(on_layer):
        on_layer(0, LayerPlan(()))
        raise ValueError("eigen-solve failed")

    with PendingPlan(planner, 3, 1) as pending:
        assert pending.layer(0).heads == ()
        with pytest.raises(ValueError, match="eigen-solve failed"):
            pending.layer(2)
        with pytest.raises(ValueError, match="eigen-solve failed"):
            pending.result()


def test_a_failing_writer_stops_the_planner():
    delivered, stopped = [], threading.Event()

    def planner(on_layer):
        try:
            for layer in range(1000):
                on_layer(layer, LayerPlan(()))
                delivered.append(layer)
                threading.Event().wait(0.002)
        except Cancelled:
            stopped.set()
            raise
        return _plan([LayerPlan(())] * 1000)

    with pytest.raises(OSError, match="disk full"), PendingPlan(planner, 1000, 1) as pending:
        pending.layer(2)
        raise OSError("disk full")
    assert stopped.is_set() and not pending._thread.is_alive() and len(delivered) < 1000


def test_compress_whose_planning_fails_leaves_nothing(twelve_layers, monkeypatch):
    """A layer that fails to plan while the export is writing: the error surfaces, nothing is left behind."""
    root, src = twelve_layers
    real, calls, lock = decompose_module.plan_layer, [], threading.Lock()

    def failing(*args, **kw):
        with lock:
            calls.append(1)
            if len(calls) == 6:
                raise RuntimeError("planning layer failed")
        return real(*args, **kw)

    monkeypatch.setattr(decompose_module, "plan_layer", failing)
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(RuntimeError, match="planning layer failed"):
        _compress(src, root / "stats.safetensors", root / "failed")
    assert sorted(p.name for p in root.iterdir()) == before


EXIT_WHILE_BUSY = """
import sys, time, torch
from kvconvert.overlap import PendingPlan
from kvconvert.streaming import read_in_background

def busy(*_):
    a = torch.randn(800, 800)
    for _ in range(30):
        a = (a @ a).tanh()  # inside torch, with the GIL released, when the main thread exits
    return {}

if sys.argv[1] == "read":
    read_in_background(busy, 0)
else:
    PendingPlan(busy, 1, 1)
time.sleep(0.1)
raise SystemExit(2)
"""


@pytest.mark.parametrize("which", ["read", "plan"])
def test_exiting_while_a_background_thread_works_keeps_the_exit_code(which):
    """A process that exits (an error line, Ctrl-C) while a layer read or the planner is inside torch exits with its
    own code. As daemon threads they aborted it: "terminate called without an active exception", exit 134."""
    r = subprocess.run([sys.executable, "-c", EXIT_WHILE_BUSY, which], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "terminate called" not in r.stderr, (r.returncode, r.stderr[-2000:])
