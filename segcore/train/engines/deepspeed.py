"""DeepSpeed ZeRO engine (stages 0-3, fp32 / bf16 / fp16 with dynamic loss scaling).

The DeepSpeed config is generated from the run config; a user JSON given with
``--deepspeed-config`` is merged on top (nested keys merge, scalars replace), which is
also how DeepSpeed's own timers (``"wall_clock_breakdown": true``) and FLOP profiler
(``"flops_profiler": {"enabled": true, "profile_step": 5}``) are switched on. On a host
without CUDA, ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported.

Checkpoints hold full (gathered) model weights, so a ZeRO-3 run's checkpoint loads into
any engine and into prediction; the optimizer state is DeepSpeed's and is not carried
across a resume (the run restarts its optimizer from the saved weights).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segcore.config import ConfigError, TrainConfig
from segcore.train.engines.base import Engine, make_optimizer, make_schedule


def import_deepspeed(device: torch.device):
    """Import DeepSpeed with the right accelerator (CPU when the run is on the CPU)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"engine 'deepspeed' needs the deepspeed package ({e}); "
                          "install it with: pip install deepspeed") from None
    return deepspeed


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``over`` wins; nested dicts merge key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_ds_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for a run config (user file merged on top)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.per_worker_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": cfg.zero_stage,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "steps_per_print": 10 ** 9,  # our Trainer prints progress
        # ZeRO partitions any torch optimizer's state; DeepSpeed only lists Adam-family
        # ones as tested and refuses SGD without this.
        "zero_allow_untested_optimizer": True,
        # No clipping, as in the single and DDP engines (recent DeepSpeed releases clip
        # at norm 1.0 by default, which silently changes the optimisation).
        "gradient_clipping": 0.0,
        "wall_clock_breakdown": False,
    }
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * cfg.grad_accum * world_size
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"--deepspeed-config {path} does not exist")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--deepspeed-config {path} is not valid JSON: {e}") from None
        ds = merge(ds, user)
    return ds


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` around the model with our optimizer and LR schedule."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device,
                 total_steps: int) -> None:
        ds_mod = import_deepspeed(device)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.ds_config = make_ds_config(cfg, world)
        self.cfg, self.device = cfg, device
        # DeepSpeed broadcasts and flattens parameters through byte views, which need
        # contiguous tensors: keep the weights NCHW. Inputs stay channels-last, and a
        # convolution with a channels-last input produces channels-last activations.
        model = model.to(memory_format=torch.contiguous_format)
        optimizer = make_optimizer(model.parameters(), cfg, device)
        scheduler = make_schedule(optimizer, cfg, total_steps)
        engine, self.optimizer, _, self.scheduler = ds_mod.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self.model = engine
        self.module = engine.module
        self._ds = ds_mod
        self._in_accum = False
        # DeepSpeed casts the weights for bf16/fp16; inputs must follow.
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_dtype is not None:
            x = x.to(self.input_dtype)
        return self.model(x)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # DeepSpeed scales by 1/grad_accum itself
        if self._in_accum:
            self.model.step()  # not a boundary: DeepSpeed only counts the micro-batch

    def step(self) -> None:
        self.model.step()  # at the accumulation boundary: optimizer, zero_grad, LR schedule

    @contextlib.contextmanager
    def accumulate(self):
        self._in_accum = True
        try:
            yield
        finally:
            self._in_accum = False

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    @property
    def lr(self) -> float:
        return float(self.model.get_lr()[0])

    @contextlib.contextmanager
    def evaluation(self):
        # ZeRO-3 partitions the weights; gather them for a local forward (every rank
        # enters this together, before its own batches).
        self.module.eval()
        try:
            with self._gathered():
                yield self._eval_forward
        finally:
            self.module.train()

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_dtype is not None:
            x = x.to(self.input_dtype)
        return self.module(x)

    def _gathered(self, modifier_rank=None):
        if self.cfg.zero_stage == 3:
            return self._ds.zero.GatheredParameters(list(self.module.parameters()),
                                                    modifier_rank=modifier_rank)
        return contextlib.nullcontext()

    def model_state_dict(self) -> dict[str, Any]:
        # Every rank must enter the gather (it is a collective under ZeRO-3).
        with self._gathered():
            return {k: v.detach().float().clone() if v.is_floating_point() else v.clone()
                    for k, v in self.module.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model_state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        with self._gathered(modifier_rank=0):
            own = self.module.state_dict()
            self.module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd["model"].items()})
