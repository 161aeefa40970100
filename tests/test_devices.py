"""Where tensors go: device placement that a CPU-only CI can check (no GPU needed), and the parallel planner."""

import pytest
import torch

from kvconvert import distributed
from kvconvert.decompose import decompose
from kvconvert.distributed import Part, gather_rows
from kvconvert.families import AttentionGeometry
from kvconvert.fold import fold_layer
from kvconvert.plan import LayerPlan
from kvconvert.progress import RichProgress
from tests.test_merge import layer_with_copies, moments, relative_error


def test_gather_rows_reduces_on_the_process_device(monkeypatch):
    """NCCL reduces CUDA tensors only: the rows of `--dataset self` must be summed on the part's device."""
    seen = []

    def fake_reduce(tensor, part):
        seen.append(tensor.device)
        return torch.zeros(tensor.shape, dtype=tensor.dtype)  # what the other process would contribute: nothing

    monkeypatch.setattr(distributed, "all_reduce_sum", fake_reduce)
    rows = torch.arange(6).reshape(3, 2)
    out = gather_rows(rows, [(0, 3)], 6, Part(0, 2, torch.device("meta")))
    assert seen == [torch.device("meta")]
    assert out.device == torch.device("cpu") and out.shape == (6, 2)


def test_gather_rows_single_process_stays_exact():
    rows = torch.arange(6).reshape(3, 2)
    out = gather_rows(rows, [(0, 1), (2, 4)], 4, Part())
    assert out.tolist() == [[0, 1], [0, 0], [2, 3], [4, 5]]


def test_decompose_in_parallel_threads_matches_sequential():
    """Layers planned concurrently give exactly the plans of the one-thread loop, each layer reported once."""
    geom = AttentionGeometry(64, 5, 8, 8, 16, 8)
    weights = [layer_with_copies(geom, [0, 1, 2, 1, 3, 0, 3, 2], biases=i % 2 == 0) for i in range(5)]
    stats = [moments(64, 500, seed=i) for i in range(5)]
    threads = torch.get_num_threads()
    plans = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            seen = []

            def on_layer(layer, plan, seen=seen):
                assert isinstance(plan, LayerPlan)
                seen.append(layer)

            plans.append(decompose(stats.__getitem__, weights.__getitem__, geom, 4, "weighted", on_layer=on_layer))
            assert sorted(seen) == list(range(5))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(plans[0].layers, plans[1].layers, strict=True):
        assert [h.kv_heads for h in a.heads] == [h.kv_heads for h in b.heads]
        for ha, hb in zip(a.heads, b.heads, strict=True):
            assert torch.equal(ha.merge.key_encoder, hb.merge.key_encoder)
            assert torch.equal(ha.merge.value_decoder, hb.merge.value_decoder)


def test_planning_threads_never_oversubscribe_the_cores(monkeypatch):
    """Each planning worker runs its eigen-solves on its share of torch's threads, not on every core: workers x
    threads per worker <= torch.get_num_threads() (8 workers x 16 OpenMP threads made a 7B layer 15x slower)."""
    from kvconvert import decompose as dec

    assert dec.plan_threads(16, 32) == (16, 1) and dec.plan_threads(4, 2) == (2, 2) and dec.plan_threads(1, 9) == (1, 1)
    geom = AttentionGeometry(64, 4, 8, 8, 16, 8)
    weights = [layer_with_copies(geom, [0, 1, 2, 1, 3, 0, 3, 2], biases=False) for _ in range(4)]
    stats = [moments(64, 300, seed=i) for i in range(4)]
    real, seen = dec.plan_layer, []

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(dec, "plan_layer", recording)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        decompose(stats.__getitem__, weights.__getitem__, geom, 4, "weighted")
    finally:
        torch.set_num_threads(threads)
    workers, per = dec.plan_threads(2, 4)
    assert len(seen) == 4 and set(seen) == {per} and workers * per <= 2


def test_progress_prints_lines_when_stderr_is_no_terminal(capsys):
    """Logs and pipes (a GPU job's output) see a long stage's progress; rich bars would stay blank there."""
    with RichProgress(line_every=0.0) as progress:
        advance = progress.task("decomposing", 3)
        for _ in range(3):
            advance()
    err = capsys.readouterr().err
    assert "decomposing: 1/3" in err
    assert "decomposing: done, 3/3" in err


def test_progress_lines_stay_quiet_for_short_stages(capsys):
    """A stage shorter than the line interval prints nothing (an error stays the only stderr line)."""
    with RichProgress(line_every=60.0) as progress:
        advance = progress.task("decomposing", 3)
        for _ in range(3):
            advance()
    assert capsys.readouterr().err.strip() == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tensor-core Gram runs on CUDA only")
def test_tensor_core_gram_matches_float64():
    """bf16 products are exact in float32; chunked float32 sums added in float64 stay within ~1e-6 relative."""
    from kvconvert.calibrate import add_gram_tensor_cores

    x = torch.randn(5000, 256, device="cuda").bfloat16() + 0.5
    acc = torch.zeros(256, 256, dtype=torch.float64, device="cuda")
    add_gram_tensor_cores(acc, x, chunk=1024)
    ref = x.double().T @ x.double()
    assert float((acc - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decompose_with_moments_on_the_gpu_matches_cpu():
    """The moments and the group-loss tables formed on the GPU give the CPU's plan."""
    geom = AttentionGeometry(64, 2, 8, 8, 16, 8)
    weights = [layer_with_copies(geom, [0, 1, 2, 1, 3, 0, 3, 2], biases=True) for _ in range(2)]
    stats = [moments(64, 500, seed=i) for i in range(2)]
    plans = [
        decompose(stats.__getitem__, weights.__getitem__, geom, 4, "weighted", device=dev) for dev in ("cpu", "cuda")
    ]
    for layer, (a, b) in enumerate(zip(plans[0].layers, plans[1].layers, strict=True)):
        assert [h.kv_heads for h in a.heads] == [h.kv_heads for h in b.heads]
        w = weights[layer]
        assert relative_error(w, fold_layer(w, b, geom), geom, 4) < 1e-8  # copies merge exactly (phase-free check)
