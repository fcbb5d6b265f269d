"""Training engines selected by name (``segcore.registry.ENGINE_SPECS``: ``single``,
``ddp``, ``deepspeed``, ``fsdp``)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from segcore.config import ConfigError, TrainConfig
from segcore.registry import engine_spec
from segcore.train.engines.base import Engine
from segcore.train.engines.sync_bn import convert_sync_batchnorm, has_batchnorm


def build_engine(model: nn.Module, cfg: TrainConfig, device: torch.device,
                 total_steps: int, distributed: bool,
                 log: Callable[[str], None] | None = None) -> Engine:
    """Wrap ``model`` for the engine named in ``cfg.engine``.

    ``ddp`` without a process group (a plain ``python`` run) falls back to nothing: the
    caller should launch with torchrun; we raise rather than silently run unwrapped.
    ``cfg.sync_bn`` turns every BatchNorm into a synchronized one first. ``log`` gets
    one-time notices (DeepSpeed compiling its CPU op).
    """
    if cfg.sync_bn:
        if engine_spec(cfg.engine).single_process:
            raise ConfigError("--sync-bn synchronizes BatchNorm across workers: use it "
                              "with --engine ddp or deepspeed, or drop it")
        bare = getattr(model, "_orig_mod", model)  # under torch.compile
        if not has_batchnorm(bare):
            raise ConfigError("--sync-bn: the model has no BatchNorm layer (only "
                              "--arch modern --norm batch has one); drop --sync-bn")
        convert_sync_batchnorm(bare, device)  # in place: the layers are children
    spec = engine_spec(cfg.engine)
    if spec.needs_group and not distributed:
        # run() creates a 1-process group for a plain process when the registry says the
        # engine needs one, so reaching here means init failed upstream.
        raise RuntimeError(f"engine {spec.name!r} needs a process group: start the run "
                           "under torchrun, or use --engine single")
    return spec.load()(model, cfg, device, total_steps, log=log)


__all__ = ["Engine", "build_engine"]
