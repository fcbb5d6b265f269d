"""Process-group setup and teardown, returning one small value object.

Reads the launcher's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, and the
processes per node and node count: torchrun's ``LOCAL_WORLD_SIZE``/``GROUP_WORLD_SIZE``,
the DeepSpeed launcher's ``LOCAL_SIZE``/``CROSS_SIZE``); without it the run is a plain
single process and no process group is created. NCCL on CUDA (one GPU per local rank),
gloo on CPU. Collectives get a finite timeout so a dead peer fails the job instead of
hanging it.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

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


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_threads_per_worker(local_world_size: int, requested: int | None = None) -> int:
    """Threads for one CPU worker: the cores this process may use / local workers (>= 1)."""
    if requested:
        return requested
    from segcore.host import usable_cores

    return max(1, usable_cores() // max(1, local_world_size))


def init_distributed(timeout_s: float = 600.0, threads: int | None = None,
                     force_device: str | None = None, need_group: bool = False) -> DistContext:
    """Initialise the process group from the launcher's environment.

    Args:
        timeout_s: collective timeout; a peer that stops answering fails the job after it.
        threads: intra-op threads per CPU worker (``None`` or 0: cores / local workers).
        force_device: ``cpu`` to stay on the CPU even when CUDA is present.
        need_group: without a launcher, still create a 1-process group (on a free
            loopback port), for engines that need one (DDP, DeepSpeed, FSDP).

    Returns:
        The :class:`DistContext` of this process.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    # torchrun: LOCAL_WORLD_SIZE / GROUP_WORLD_SIZE; the DeepSpeed launcher: LOCAL_SIZE /
    # CROSS_SIZE. Threads and loader workers are sized from the processes on this node.
    local_world = _env_int("LOCAL_WORLD_SIZE", 0) or _env_int("LOCAL_SIZE", world)
    nnodes = (_env_int("GROUP_WORLD_SIZE", 0) or _env_int("CROSS_SIZE", 0)
              or max(1, world // max(1, local_world)))
    use_cuda = torch.cuda.is_available() and force_device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cpu_threads_per_worker(local_world, threads))
    backend = None
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if launched or need_group:
        backend = "nccl" if use_cuda else "gloo"
        if not tdist.is_initialized():
            kwargs: dict = {"device_id": device} if use_cuda else {}
            if not launched:  # a plain process: its own 1-process group, env untouched
                kwargs["init_method"] = f"tcp://127.0.0.1:{free_port()}"
            tdist.init_process_group(backend=backend, rank=rank, world_size=world,
                                     timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank, local_rank, world, local_world, nnodes, device, backend)


def teardown() -> None:
    """Destroy the process group if there is one (safe to call always, e.g. in ``finally``)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op without a process group). Under NCCL a
    CPU tensor (an accumulator kept on the host) makes a round trip through the GPU."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return t
    if tdist.get_backend() == "nccl" and t.device.type != "cuda":
        buf = t.to(torch.device("cuda", torch.cuda.current_device()))
        tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
        t.copy_(buf)
    else:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def gather_objects(obj) -> list:
    """Every rank's ``obj`` on every rank (a one-element list without a process group)."""
    if tdist.is_available() and tdist.is_initialized():
        out = [None] * tdist.get_world_size()
        tdist.all_gather_object(out, obj)
        return out
    return [obj]
