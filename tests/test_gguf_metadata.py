"""The GGUF header reader (`kvconvert.gguf_metadata`) against the `gguf` package's own writer and reader."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from gguf import GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvconvert.gguf_metadata import check_complete, read_metadata
from kvconvert.sources import gguf_license, gguf_provenance

SCALARS = {
    GGUFValueType.UINT8: st.integers(0, 2**8 - 1),
    GGUFValueType.INT8: st.integers(-(2**7), 2**7 - 1),
    GGUFValueType.UINT16: st.integers(0, 2**16 - 1),
    GGUFValueType.INT16: st.integers(-(2**15), 2**15 - 1),
    GGUFValueType.UINT32: st.integers(0, 2**32 - 1),
    GGUFValueType.INT32: st.integers(-(2**31), 2**31 - 1),
    GGUFValueType.UINT64: st.integers(0, 2**64 - 1),
    GGUFValueType.INT64: st.integers(-(2**63), 2**63 - 1),
    GGUFValueType.FLOAT32: st.floats(width=32, allow_nan=False),
    GGUFValueType.FLOAT64: st.floats(allow_nan=False),
    GGUFValueType.BOOL: st.booleans(),
    GGUFValueType.STRING: st.text(max_size=12),
}


@st.composite
def fields(draw) -> tuple[GGUFValueType, GGUFValueType | None, object]:
    """(type, item type for arrays, value) of one metadata field."""
    if draw(st.booleans()):
        kind = draw(st.sampled_from(list(SCALARS)))
        return kind, None, draw(SCALARS[kind])
    item = draw(st.sampled_from(list(SCALARS)))
    return GGUFValueType.ARRAY, item, draw(st.lists(SCALARS[item], min_size=1, max_size=6))  # none empty: refused


def write_gguf(path: Path, entries: dict, endian: GGUFEndian = GGUFEndian.LITTLE) -> None:
    writer = GGUFWriter(path, "llama", endianess=endian)
    for key, (kind, item, value) in entries.items():
        writer.add_key_value(key, value, kind, sub_type=item)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reference(path: Path, keys) -> dict:
    fields = GGUFReader(str(path)).fields
    return {k: fields[k].contents() for k in keys if k in fields}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.dictionaries(st.from_regex(r"[a-z]{1,6}\.[a-z_]{1,8}", fullmatch=True), fields(), max_size=8),
    ask=st.lists(st.from_regex(r"[a-z]{1,6}\.[a-z_]{1,8}", fullmatch=True), max_size=2),
    big_endian=st.booleans(),
)
def test_values_read_from_the_header_are_the_gguf_readers(tmp_path, entries, ask, big_endian):
    path = tmp_path / "m.gguf"
    write_gguf(path, entries, GGUFEndian.BIG if big_endian else GGUFEndian.LITTLE)
    keys = [*entries][::2] + ask  # some present keys (not only the first), and maybe some absent ones
    got = read_metadata(path, keys)
    assert got == reference(path, keys)
    assert set(got) == set(keys) & (set(entries) | {"general.architecture"})


def test_the_license_and_quantisation_of_a_gguf_after_its_tokenizer(tmp_path):
    """The two keys kvconvert asks for, placed after a large string array (the vocabulary)."""
    path = tmp_path / "m.gguf"
    tokens = [f"tok{i}" for i in range(5000)]
    write_gguf(
        path,
        {
            "tokenizer.ggml.tokens": (GGUFValueType.ARRAY, GGUFValueType.STRING, tokens),
            "tokenizer.ggml.scores": (GGUFValueType.ARRAY, GGUFValueType.FLOAT32, [0.5] * 5000),
            "general.license": (GGUFValueType.STRING, None, "mit"),
            "general.file_type": (GGUFValueType.UINT32, None, 32),
        },
    )
    assert gguf_license(path) == "mit"
    origin = gguf_provenance(path)
    assert (origin["quantization"], origin["dtype"]) == ("BF16", "bfloat16")
    assert read_metadata(path, ["tokenizer.ggml.tokens"])["tokenizer.ggml.tokens"] == tokens


def test_damaged_or_foreign_files_are_value_errors_and_lose_only_the_card_lines(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, {"general.license": (GGUFValueType.STRING, None, "mit")})
    whole = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: whole.index(b"mit") + 2])  # the license string cut short
    with pytest.raises(ValueError, match="ends early"):
        read_metadata(cut, ["general.license"])
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + whole[4:])
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_metadata(foreign, ["general.license"])
    old = tmp_path / "v1.gguf"
    old.write_bytes(whole[:4] + struct.pack("<I", 1) + whole[8:])
    with pytest.raises(ValueError, match="version 1"):
        read_metadata(old, ["general.license"])
    assert gguf_license(cut) is None and gguf_license(foreign) is None
    assert gguf_provenance(cut)["dtype_from"] == "default for quantized GGUF"


def write_model_gguf(path: Path, arch: str = "llama", hparams: bool = True) -> None:
    """A GGUF with an architecture, its hyperparameters (unless not `hparams`) and three tensors, two quantized."""
    import numpy as np
    from gguf import GGMLQuantizationType, quantize

    writer = GGUFWriter(path, arch)
    if hparams:
        writer.add_block_count(1)
        writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.ones((16, 64), np.float32))
    for name, qtype in (
        ("blk.0.attn_q.weight", GGMLQuantizationType.Q8_0),
        ("output.weight", GGMLQuantizationType.Q4_0),
    ):
        data = quantize(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_complete_gguf_passes_and_cut_or_partial_ones_say_what_is_wrong(tmp_path):
    path = tmp_path / "m.gguf"
    write_model_gguf(path)
    check_complete(path)  # every byte its header describes is there
    whole = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:-1])  # the last byte of the last tensor missing
    with pytest.raises(ValueError, match=f"cut short: {len(whole) - 1:,} bytes of the {len(whole):,}"):
        check_complete(cut)
    cut.write_bytes(whole[:200])
    with pytest.raises(ValueError, match="ends early"):
        check_complete(cut)
    write_model_gguf(path, hparams=False)
    with pytest.raises(ValueError, match=r"lacks llama\.block_count, llama\.embedding_length$"):
        check_complete(path)
    u32 = GGUFValueType.UINT32
    write_gguf(path, {"llama.block_count": (u32, None, 1), "llama.embedding_length": (u32, None, 64)})
    with pytest.raises(ValueError, match="lacks tensors"):
        check_complete(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_random_byte_damage_passes_or_is_one_value_error(tmp_path, damage):
    path, bad = tmp_path / "m.gguf", tmp_path / "bad.gguf"
    if not path.exists():
        write_model_gguf(path)
    data = bytearray(path.read_bytes())
    for at, byte in damage:
        data[at % len(data)] = byte
    bad.write_bytes(bytes(data))
    with contextlib.suppress(ValueError):  # anything else (OSError, MemoryError, ...) fails the test
        check_complete(bad)
    with contextlib.suppress(ValueError):
        read_metadata(bad, ["general.alignment", "tokenizer.ggml.tokens"])
