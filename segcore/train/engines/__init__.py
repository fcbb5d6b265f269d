"""Training engines selected by name: ``single``, ``ddp``, ``deepspeed``, ``fsdp``."""

from __future__ import annotations

import torch
from torch import nn

from segcore.config import TrainConfig
from segcore.train.engines.base import Engine


def build_engine(model: nn.Module, cfg: TrainConfig, device: torch.device,
                 total_steps: int, distributed: bool) -> Engine:
    """Wrap ``model`` for the engine named in ``cfg.engine``.

    ``ddp`` without a process group (a plain ``python`` run) falls back to nothing: the
    caller should launch with torchrun; we raise rather than silently run unwrapped.
    """
    if cfg.engine == "single":
        return Engine(model, cfg, device, total_steps)
    if cfg.engine == "ddp":
        if not distributed:
            # A 1-process group is created by the launcher for plain runs (see
            # launch/train.py), so reaching here means init failed upstream.
            raise RuntimeError("engine 'ddp' needs a process group: start the run under "
                               "torchrun, or use --engine single")
        from segcore.train.engines.ddp import DDPEngine
        return DDPEngine(model, cfg, device, total_steps)
    if cfg.engine == "fsdp":
        from segcore.train.engines.fsdp import FSDPEngine
        return FSDPEngine(model, cfg, device, total_steps)  # raises without a group
    from segcore.train.engines.deepspeed import DeepSpeedEngine
    return DeepSpeedEngine(model, cfg, device, total_steps)


__all__ = ["Engine", "build_engine"]
