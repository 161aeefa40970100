"""Several calibration processes (torchrun / accelerate launch): which batches are whose, and summing across them.

Batches are dealt round-robin, so every batch has the same windows as in a single-process run and the per-batch
sums are identical; only the order of the float64 additions differs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Part:
    """This process's share: rank `rank` of `world`, on `device`."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batches(self, n: int, batch_size: int) -> list[tuple[int, int]]:
        """(start, stop) of the batches of `n` windows that this process handles."""
        spans = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
        return spans[self.rank :: self.world]


@contextmanager
def current_part() -> Iterator[Part]:
    """The launcher's process layout (one process when not launched by torchrun/accelerate).

    On leaving, every process waits for the others and the process group is torn down: a process that exits
    with gloo's threads still running aborts ("terminate called without an active exception").
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield Part()
        return
    from accelerate import PartialState

    cuda = torch.cuda.is_available()
    state = PartialState(cpu=not cuda)  # on CPU, gloo
    try:
        yield Part(state.process_index, state.num_processes, state.device if cuda else torch.device("cpu"))
        state.wait_for_everyone()
    finally:
        end_process_group()


def end_process_group() -> None:
    """Destroy the default process group if one is up (a no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, part: Part) -> torch.Tensor:
    """Sum of `tensor` over all processes (in place where distributed)."""
    if part.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(rows: torch.Tensor, spans: list[tuple[int, int]], n: int, part: Part) -> torch.Tensor:
    """Reassemble the (n, ...) tensor whose rows `spans` this process holds (in span order) on every process."""
    # The sum runs on this process's device: NCCL (the backend on GPUs) reduces only CUDA tensors.
    dev = part.device if part.world > 1 and part.device is not None else torch.device("cpu")
    full = torch.zeros((n, *rows.shape[1:]), dtype=rows.dtype, device=dev)
    offset = 0
    for start, stop in spans:
        full[start:stop] = rows[offset : offset + stop - start].to(dev)
        offset += stop - start
    return (all_reduce_sum(full, part) if part.world > 1 else full).cpu()
