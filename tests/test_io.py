"""The IO toolkit (kvconvert.io): the streaming safetensors writer, staged outputs, locks and cache fills."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kvconvert.errors import KVConvertError
from kvconvert.io.shards import SafetensorsWriter, ShardPlan, spec_of, write_safetensors, write_shards
from kvconvert.io.staging import output_lock, staged

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8]
DTYPES += [torch.uint8, torch.bool, torch.int16]


def mixed_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        t = torch.randn(3 + i, 5, generator=gen) * 50
        out[f"t{(7 * i) % 10}.{dtype}".replace("torch.", "")] = t.to(dtype)
    out["scalar"] = torch.tensor(3.25)
    out["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    out["a.last.noncontiguous"] = torch.randn(6, 4, generator=gen).T
    return out


def test_streamed_file_is_byte_identical_to_save_file(tmp_path):
    tensors = mixed_tensors()
    for metadata in (None, {"format": "pt"}, {"sources": json.dumps([{"a": "ü"}])}):
        save_file({n: t.contiguous() for n, t in tensors.items()}, tmp_path / "lib.safetensors", metadata=metadata)
        specs = {n: spec_of(t) for n, t in reversed(tensors.items())}
        write_safetensors(tmp_path / "ours.safetensors", specs, tensors.__getitem__, metadata)
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
        back = load_file(tmp_path / "ours.safetensors")
        assert all(torch.equal(back[n], t) for n, t in tensors.items())


def test_writer_refuses_wrong_order_shape_or_missing_tensors(tmp_path):
    tensors = {"a": torch.zeros(2), "b": torch.zeros(3)}
    specs = {n: spec_of(t) for n, t in tensors.items()}
    writer = SafetensorsWriter(tmp_path / "x", specs)
    with pytest.raises(ValueError, match="out of order"):
        writer.add("b", tensors["b"])
    with pytest.raises(ValueError, match="header says"):
        writer.add("a", torch.zeros(4))
    writer.add("a", tensors["a"])
    with pytest.raises(ValueError, match="incomplete"):
        writer.close()


def test_shards_match_hugging_face_split_and_index(tmp_path):
    tensors = {f"layer.{i}.w": torch.full((64, 64), float(i)) for i in range(10)}
    specs = {n: spec_of(t) for n, t in tensors.items()}
    plan = ShardPlan.split(specs, "40KB")
    assert plan.sharded and len(plan.files) > 2
    written = write_shards(tmp_path, specs, tensors.__getitem__, plan)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == written == 10 * 64 * 64 * 4
    for name, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            assert torch.equal(f.get_tensor(name), tensors[name])
            assert f.metadata() == {"format": "pt"}


PEAK_CHILD = """
import resource, sys, torch
from pathlib import Path
from kvconvert.io.shards import write_safetensors
n, mb = int(sys.argv[2]), int(sys.argv[3])
specs = {f"t{i:04d}": (torch.float32, (mb * 2**18,)) for i in range(n)}
def hwm():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
torch.ones(mb * 2**18).sum()  # warm the allocator
base = hwm()
write_safetensors(Path(sys.argv[1]), specs, lambda name: torch.full((mb * 2**18,), float(int(name[1:]))))
print(hwm() - base)
"""


def test_peak_memory_while_writing_a_large_shard_stays_near_one_tensor(tmp_path):
    """A 256 MiB shard of 64 tensors of 4 MiB, each made when asked for: the high-water mark grows by about one
    tensor (a dict-then-save_file writer would hold all 256 MiB)."""
    out = tmp_path / "big.safetensors"
    r = subprocess.run(
        [sys.executable, "-c", PEAK_CHILD, str(out), "64", "4"], capture_output=True, text=True, check=True
    )
    grew = int(r.stdout.strip())
    assert out.stat().st_size > 256 * 2**20
    assert grew < 48 * 2**20, f"peak RSS grew by {grew / 2**20:.0f} MiB while writing 256 MiB"
    with safe_open(str(out), framework="pt") as f:
        assert float(f.get_tensor("t0063")[0]) == 63.0


def test_staged_output_is_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KVConvertError, match="--overwrite"), staged(out):
        pass
    with pytest.raises(RuntimeError), staged(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("a check failed")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with staged(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_refuses_inputs_even_with_overwrite(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for target in (model, model / "sub", tmp_path):
        with pytest.raises(KVConvertError, match="overlaps the input"), staged(target, overwrite=True, inputs=[model]):
            pass


def test_leftover_temporary_of_a_killed_run_is_removed(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.kvconvert-tmp").mkdir()
    (tmp_path / ".out.kvconvert-tmp" / "partial").write_text("x")
    with staged(out) as tmp:
        assert not any(tmp.iterdir())
        (tmp / "f").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


LOCK_CHILD = """
import sys
from pathlib import Path
from kvconvert.errors import KVConvertError
from kvconvert.io.staging import output_lock
try:
    with output_lock(Path(sys.argv[1])):
        print("acquired")
except KVConvertError as exc:
    print(exc)
"""


def test_a_second_writer_of_the_same_output_is_refused(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        r = subprocess.run([sys.executable, "-c", LOCK_CHILD, str(out)], capture_output=True, text=True, check=True)
        assert "another kvconvert run is writing" in r.stdout
    r = subprocess.run([sys.executable, "-c", LOCK_CHILD, str(out)], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "acquired"
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the lock


def test_files_written_follow_the_umask(tmp_path):
    code = textwrap.dedent(
        """
        import os, sys, torch
        from pathlib import Path
        from kvconvert.io.shards import SafetensorsWriter, ShardPlan, spec_of, write_shards
        from kvconvert.io.staging import staged
        os.umask(0o027)
        t = {"a": torch.zeros(3)}
        with staged(Path(sys.argv[1])) as tmp:
            write_shards(tmp, {"a": spec_of(t["a"])}, t.__getitem__, ShardPlan.split({"a": spec_of(t["a"])}))
            (tmp / "config.json").write_text("{}")
        """
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], check=True)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == {"model.safetensors": 0o640, "config.json": 0o640}
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


FILL_CHILD = """
import sys, time
from pathlib import Path
from kvconvert.io.cache import locked_fill
def build(tmp):
    time.sleep(0.5)
    (tmp / "config.json").write_text(sys.argv[2])
print(locked_fill(Path(sys.argv[1]), build))
"""


def test_concurrent_cache_fills_build_once(tmp_path):
    target = tmp_path / "cache" / "entry"
    for _ in range(3):
        procs = [
            subprocess.Popen([sys.executable, "-c", FILL_CHILD, str(target), str(i)], stdout=subprocess.PIPE, text=True)
            for i in range(2)
        ]
        outs = [p.communicate()[0].strip() for p in procs]
        assert [p.returncode for p in procs] == [0, 0]
        assert outs == [str(target)] * 2
        assert (target / "config.json").read_text() in ("0", "1")
        assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == ["entry"]
        os.system(f"rm -rf {target}")


def test_scratch_of_a_killed_run_is_swept_but_a_live_one_is_kept(tmp_path):
    from kvconvert.io.staging import _try_lock, scratch_dir

    dead, live = tmp_path / ".kvconvert-scratch-dead", tmp_path / ".kvconvert-scratch-live"
    for d in (dead, live):
        d.mkdir()
        (d / "big.bin").write_bytes(b"x")
    code = "import fcntl,os,sys,time; fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT); fcntl.flock(fd,fcntl.LOCK_EX); "
    code += "print('held',flush=True); time.sleep(30)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(live / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with scratch_dir(tmp_path) as mine:
            assert mine.exists() and _try_lock(mine / ".lock") is None  # ours is held while we run
            assert not dead.exists() and live.exists()
        assert not mine.exists()
    finally:
        holder.kill()
        holder.wait()
