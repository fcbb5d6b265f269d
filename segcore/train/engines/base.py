"""The engine interface the Trainer drives, and the plain single-process engine.

An engine owns the (possibly wrapped) model, the optimizer, the LR schedule and the
precision policy. The Trainer calls only :meth:`Engine.forward`, :meth:`Engine.backward`,
:meth:`Engine.step`, :meth:`Engine.accumulate` and the state-dict methods, so ``single``,
``ddp`` and ``deepspeed`` run the same training code path.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from segcore.config import TrainConfig
from segcore.precision import PrecisionPolicy


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD with momentum; fused kernels on CUDA (fewer launches per step).

    SGD is there because its update is linear in the gradient: a gradient that is summed
    where it should be averaged changes an SGD trajectory, while Adam normalizes it away.
    """
    kwargs: dict[str, Any] = {"lr": cfg.effective_lr, "weight_decay": cfg.weight_decay}
    if device.type == "cuda":
        kwargs["fused"] = True
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=0.9, **kwargs)
    klass = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return klass(params, **kwargs)


def lr_warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """Linear lr warm-up length: as configured, else 5 % of the steps when the lr was
    scaled up for a larger global batch (Goyal et al. 2017), else none."""
    if cfg.lr_warmup_steps is not None:
        return min(cfg.lr_warmup_steps, max(0, total_steps - 1))
    return int(0.05 * total_steps) if cfg.effective_lr > cfg.lr else 0


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig,
                  total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Optional linear warm-up, then cosine decay (or constant) over ``total_steps``."""
    sched = torch.optim.lr_scheduler
    warm = lr_warmup_steps(cfg, total_steps)
    main = (sched.CosineAnnealingLR(opt, T_max=max(1, total_steps - warm))
            if cfg.schedule == "cosine" else None)
    if not warm:
        return main
    ramp = sched.LinearLR(opt, start_factor=1.0 / (warm + 1), total_iters=warm)
    return sched.SequentialLR(opt, [ramp, main or sched.ConstantLR(opt, factor=1.0,
                                                                    total_iters=0)],
                              milestones=[warm])


class Engine:
    """Single process, no wrapper: the baseline that DDP overhead is measured against.

    Args:
        model: the bare model, already on the device and in its memory format.
        cfg: optimizer, schedule and precision settings.
        device: the training device.
        total_steps: optimizer steps planned (for the LR schedule).
        log: one-time notices (every engine takes it; DeepSpeed uses it).
    """

    name = "single"

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device,
                 total_steps: int, log: Callable[[str], None] | None = None) -> None:
        # The bare module (unwrapped from torch.compile) owns the state dict; calls go
        # through ``self.model`` (compiled and/or wrapped).
        self.module = getattr(model, "_orig_mod", model)
        self.model: Callable[[torch.Tensor], torch.Tensor] = model
        self.cfg = cfg
        self.device = device
        self.policy = PrecisionPolicy(cfg.precision, device.type)
        self.optimizer = make_optimizer(model.parameters(), cfg, device)
        self.scheduler = make_schedule(self.optimizer, cfg, total_steps)
        self.scaler = self.policy.grad_scaler()

    # -- the step -----------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.policy.autocast():
            return self.model(x)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.cfg.grad_accum).backward()

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def accumulate(self) -> contextlib.AbstractContextManager:
        """Context for a micro-batch whose gradients are not yet synchronised."""
        return contextlib.nullcontext()

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    @contextlib.contextmanager
    def evaluation(self):
        """``with engine.evaluation() as fwd: logits = fwd(x)``: a local, collective-free
        forward in eval mode (each rank may see a different number of batches)."""
        self.module.eval()
        try:
            yield self._eval_forward
        finally:
            self.module.train()

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.policy.autocast():
            return self.module(x)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
              "scaler": self.scaler.state_dict()}
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.module.load_state_dict(sd["model"])
        if "optimizer" in sd:
            self.optimizer.load_state_dict(sd["optimizer"])
        if "scaler" in sd:
            self.scaler.load_state_dict(sd["scaler"])
        if self.scheduler is not None and "scheduler" in sd:
            self.scheduler.load_state_dict(sd["scheduler"])

    def model_state_dict(self) -> dict[str, Any]:
        """Full (unsharded) model weights, for export and prediction."""
        return self.module.state_dict()
