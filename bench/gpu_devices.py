"""GPU part 1: every stage of the CLI on `--device auto` (the GPU when there is one), end to end on SmolLM2.

compress (calibrate + decompose + refine + export + verify), heal (train, write, verify: the stage that crashed
on a GPU before), eval (perplexity, KV cache, a runtime probe). Records each command's exit code, time and output
tail in docs/results/gpu/devices.json.
"""

from __future__ import annotations

import sys

from bench.corpora import pydoc_split
from bench.gpu_common import KVCONVERT, SMOKE, SMOL, WORK, left, run, save
from bench.gpu_scale import stage_times

DEVICE_TESTS = [
    "tests/test_razor_runtime.py::test_windowed_heads_match_a_direct_masked_computation",
    "tests/test_matryoshka.py::test_cached_decoding_at_mixed_rates_matches_the_masked_full_pass_and_really_cuts",
    "tests/test_matryoshka.py::test_a_model_moved_after_a_forward_pass_uses_projections_on_its_new_place",
]
"""Tests parametrised over `tests.tiny.DEVICES` in files that are otherwise CPU work: their GPU cases."""


def main() -> None:
    work = WORK / "devices"
    a, b = pydoc_split(WORK / "text")
    samples, seq = (4, 128) if SMOKE else (32, 1024)
    conv, healed = work / "conv", work / "healed"
    on_gpu = ["tests/test_devices.py", "tests/test_verify.py", *DEVICE_TESTS]
    steps = [("pytest", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *on_gpu])]
    compress = [*KVCONVERT, "compress", SMOL, "--heads", "1", "--dataset", str(a), "--samples", str(samples)]
    compress += ["--seq-len", str(seq), "--batch-size", "4", "--refine-steps", "5", "--refine-samples", "4"]
    compress += ["--device", "auto", "--overwrite", "--output", str(conv)]
    steps.append(("compress", compress))
    heal = [*KVCONVERT, "heal", str(conv), "--teacher", SMOL, "--dataset", str(a), "--tokens"]
    heal += ["512" if SMOKE else "200000", "--seq-len", str(seq), "--batch-size", "4", "--device", "auto"]
    heal += ["--overwrite", "--output", str(healed)]
    steps.append(("heal", heal))
    ev = [*KVCONVERT, "eval", str(conv), "--baseline", SMOL, "--dataset", str(b), "--samples", str(samples // 2)]
    ev += ["--seq-len", str(seq), "--contexts", "256" if SMOKE else "2048", "--new-tokens", "4", "--repeats", "1"]
    ev += ["--device", "auto"]
    steps.append(("eval", ev))
    results = {}
    for name, cmd in steps:
        r = run(cmd, work / f"{name}.log", min(240.0, left(240.0) - 5))
        if name == "compress":
            r["stages"] = stage_times(r["log"])
        del r["log"]
        results[name] = r
        save("devices", {"steps": results, "ok": all(r["rc"] == 0 for r in results.values())})


if __name__ == "__main__":
    main()
