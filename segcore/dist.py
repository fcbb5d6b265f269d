"""Process-group setup and teardown, returning one small value object.

Reads the torchrun environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``GROUP_WORLD_SIZE``/``NNODES``); without it the run is a plain
single process and no process group is created. NCCL on CUDA (one GPU per local rank),
gloo on CPU. Collectives get a finite timeout so a dead peer fails the job instead of
hanging it.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    nnodes: int
    device: torch.device
    backend: str | None  # None: no process group (plain single process)

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def cpu_threads_per_worker(local_world_size: int, requested: int = 0) -> int:
    """Threads for one CPU worker: the cores this process may use / local workers (>= 1)."""
    if requested > 0:
        return requested
    from segcore.host import usable_cores

    return max(1, usable_cores() // max(1, local_world_size))


def init_distributed(timeout_s: float = 600.0, threads: int = 0,
                     force_device: str | None = None) -> DistContext:
    """Initialise the process group from the launcher's environment.

    Args:
        timeout_s: collective timeout; a peer that stops answering fails the job after it.
        threads: intra-op threads per CPU worker (0 = cores / local workers).
        force_device: ``cpu`` to stay on the CPU even when CUDA is present.

    Returns:
        The :class:`DistContext` of this process.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    nnodes = _env_int("GROUP_WORLD_SIZE", 0) or max(1, world // max(1, local_world))
    use_cuda = torch.cuda.is_available() and force_device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cpu_threads_per_worker(local_world, threads))
    backend = None
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        backend = "nccl" if use_cuda else "gloo"
        if not tdist.is_initialized():
            kwargs = {"device_id": device} if use_cuda else {}
            tdist.init_process_group(backend=backend, rank=rank, world_size=world,
                                     timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank, local_rank, world, local_world, nnodes, device, backend)


def teardown() -> None:
    """Destroy the process group if there is one (safe to call always, e.g. in ``finally``)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


@contextmanager
def distributed(timeout_s: float = 600.0, threads: int = 0,
                force_device: str | None = None) -> Iterator[DistContext]:
    """``with distributed() as ctx:`` — init, and teardown even on error."""
    ctx = init_distributed(timeout_s, threads, force_device)
    try:
        yield ctx
    finally:
        teardown()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op without a process group)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def gather_objects(obj) -> list:
    """Every rank's ``obj`` on every rank (a one-element list without a process group)."""
    if tdist.is_available() and tdist.is_initialized():
        out = [None] * tdist.get_world_size()
        tdist.all_gather_object(out, obj)
        return out
    return [obj]
