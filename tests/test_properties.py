"""Property-based tests (hypothesis): whole classes of `--heads` values and of damaged statistics files get either a
valid result or one KVConvertError, never a traceback of another kind."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvconvert.errors import KVConvertError
from kvconvert.families import AttentionGeometry
from kvconvert.stats import CalibrationStats, pack
from kvconvert.targets import parse_heads, valid_counts

geometries = st.builds(
    lambda kv, rep: AttentionGeometry(64, 2, kv * rep, kv, 16, 16),
    st.integers(1, 64),
    st.sampled_from([1, 2, 4]),
)


@given(geometries, st.text(max_size=12))
def test_any_heads_text_gives_a_valid_count_or_one_error(geom, text):
    try:
        n = parse_heads(text, geom)
    except KVConvertError as exc:
        assert "\n" not in str(exc) and "valid counts" in str(exc)
    else:
        assert n in valid_counts(geom)


@given(geometries, st.data())
def test_counts_and_exact_fractions_round_trip(geom, data):
    valid = valid_counts(geom)
    if not valid:
        return
    n = data.draw(st.sampled_from(valid))
    assert parse_heads(str(n), geom) == n
    frac = Fraction(n, geom.num_kv_heads)
    assert parse_heads(f"{frac.numerator}/{frac.denominator}", geom) == n
    d = frac.denominator
    while d % 2 == 0 or d % 5 == 0:
        d //= 2 if d % 2 == 0 else 5
    if d == 1:  # a finite decimal
        assert parse_heads(str(float(frac)), geom) == n


@given(geometries, st.sampled_from(["1.0", "1/1", "1.", "2/2", "1.00"]))
def test_one_point_zero_keeps_every_head_and_is_refused(geom, text):
    with pytest.raises(KVConvertError, match="not lower"):
        parse_heads(text, geom)


def small_stats(n_layers: int = 2, hidden: int = 4) -> CalibrationStats:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(50, hidden, generator=gen, dtype=torch.float64) for _ in range(n_layers)]
    sum_x = torch.stack([x.sum(0) for x in xs])
    return CalibrationStats(sum_x, [pack(x.T @ x) for x in xs], 50, {"num_layers": n_layers, "hidden_size": hidden})


def read_all(path) -> None:
    stats = CalibrationStats.load(path)
    for layer in range(stats.num_layers):
        stats.moments(layer)


@pytest.fixture(scope="module")
def stats_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("stats") / "s.safetensors"
    small_stats().save(path)
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_statistics_files_read_or_give_one_error(stats_bytes, tmp_path, data):
    """Flipped bytes, truncation or appended junk anywhere in the file: it reads (bytes of sums changed) or it is
    refused with one KVConvertError line."""
    raw = bytearray(stats_bytes)
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "zero"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "append":
        raw += data.draw(st.binary(min_size=1, max_size=16))
    else:
        start = data.draw(st.integers(0, len(raw) - 1))
        raw[start : start + data.draw(st.integers(1, 64))] = bytes(min(64, len(raw) - start))[: len(raw[start:])]
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(raw))
    try:
        read_all(path)
    except KVConvertError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda s: CalibrationStats(s.sum_x, s.packed_xx, 0, s.fingerprint), "0 calibration tokens"),
        (lambda s: CalibrationStats(s.sum_x * 0, s.packed_xx, 50, s.fingerprint), "all-zero"),
        (lambda s: CalibrationStats(s.sum_x, s.packed_xx, 50, s.fingerprint | {"num_layers": 3}), "fingerprint says"),
    ],
)
def test_inconsistent_statistics_are_refused(tmp_path, mutate, needle):
    mutate(small_stats()).save(tmp_path / "s.safetensors")
    with pytest.raises(KVConvertError, match=needle):
        read_all(tmp_path / "s.safetensors")


def test_statistics_with_a_missing_layer_tensor_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    small_stats().save(tmp_path / "s.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(tmp_path / "s.safetensors")
    del tensors["layers.1.sum_xx"]
    save_file(tensors, tmp_path / "s.safetensors", metadata=meta)
    with pytest.raises(KVConvertError, match=r"lacks layers\.1\.sum_xx"):
        read_all(tmp_path / "s.safetensors")


def test_statistics_of_many_layers_round_trip(tmp_path):
    """Layers are appended in order 0, 1, ..., 11 (not the name order 0, 1, 10, 11, 2, ...)."""
    stats = small_stats(n_layers=12, hidden=3)
    stats.save(tmp_path / "s.safetensors")
    back = CalibrationStats.load(tmp_path / "s.safetensors")
    assert torch.equal(back.sum_x, stats.sum_x)
    assert all(torch.equal(back.packed_xx[i], stats.packed_xx[i]) for i in range(12))
