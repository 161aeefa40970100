"""CPU thread policy: how many threads torch uses, and how idle OpenMP threads wait.

On a busy machine, OpenMP threads that spin while waiting for each other (libgomp's default) fight the other
processes for the same cores and a run slows down 20-50x. Threads that sleep when idle (`OMP_WAIT_POLICY=PASSIVE`)
and one thread per free physical core keep the slowdown near the share of the cores the run actually gets.

`prepare_environment` must run before torch is imported (OpenMP reads its environment when it is loaded);
`apply` sets torch's thread count afterwards.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}


def prepare_environment() -> None:
    """Make idle OpenMP threads sleep instead of spin, unless the user chose otherwise. Call before importing torch."""
    for key, value in WAIT_POLICY.items():
        os.environ.setdefault(key, value)


def physical_cores(cpuinfo: str | None = None) -> int:
    """Physical cores this process may run on (SMT siblings counted once)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    cores, physical = set(), None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    logical = os.cpu_count() or usable
    if cores and logical > len(cores):  # SMT: scale the usable logical CPUs by cores per logical CPU
        return max(1, usable * len(cores) // logical)
    return max(1, usable)


def other_load(samples: int = 9, pause: float = 0.01) -> float:
    """Threads of other processes that want a CPU right now: the median of a few reads of /proc/stat's
    `procs_running` (which counts this process too), 0 where it cannot be read. Unlike the load average, it sees
    work that started a moment ago and forgets work that just ended (such as the install before a first run)."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return 0.0
    counts = []
    for i in range(samples):
        for line in stat.read_text().splitlines():
            if line.startswith("procs_running"):
                counts.append(int(line.split()[1]) - 1)
        if i + 1 < samples:
            time.sleep(pause)
    return float(max(0, sorted(counts)[len(counts) // 2])) if counts else 0.0


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """Physical cores minus the load already on them (rounded), at least 1."""
    cores = physical_cores() if cores is None else cores
    load = other_load() if load is None else load
    return max(1, min(cores, round(cores - load)))


def choose(threads: int | None) -> int:
    """`threads` if given, else $OMP_NUM_THREADS if set, else `default_threads()`."""
    if threads is not None:
        if threads < 1:
            from kvconvert.errors import KVConvertError

            raise KVConvertError(f"--threads {threads}: give 1 or more")
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return default_threads()


def apply(threads: int | None = None) -> int:
    """Use `choose(threads)` CPU threads; return the count.

    Before torch is imported this only sets $OMP_NUM_THREADS/$MKL_NUM_THREADS (torch and child processes read
    them), so it costs nothing for commands that never load torch; afterwards it calls `torch.set_num_threads`.
    """
    n = choose(threads)
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    else:
        torch.set_num_threads(n)
    return n
