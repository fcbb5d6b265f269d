"""PyTorch DistributedDataParallel engine."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from segcore.config import TrainConfig
from segcore.train.engines.base import Engine


class DDPEngine(Engine):
    """DDP around the model; the optimizer and precision policy are the single engine's.

    Channels-last is applied to the model before wrapping (DDP's gradient buckets then
    match the parameters' layout), gradients are bucket views (no extra copy), and
    :meth:`accumulate` skips the all-reduce on micro-batches that do not step.
    """

    name = "ddp"

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device,
                 total_steps: int, log: Callable[[str], None] | None = None) -> None:
        super().__init__(model, cfg, device, total_steps)
        ids = [device.index] if device.type == "cuda" else None
        self.model = DDP(model, device_ids=ids, gradient_as_bucket_view=True,
                         static_graph=cfg.grad_accum == 1 and not model.cfg.compile)

    def accumulate(self):
        return self.model.no_sync()
