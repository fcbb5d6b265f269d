"""PyTorch FSDP2 engine (``torch.distributed.fsdp.fully_shard``).

Every parameter, gradient and optimizer state is sharded over the workers (ZeRO-3
semantics). Each U-Net block (encoder and decoder double-convolutions, up-convolutions)
is its own FSDP unit, so its weights are all-gathered just before its forward and
backward and freed after; the root unit holds the rest (the 1x1 head).

Mixed precision is FSDP's ``MixedPrecisionPolicy``: bf16 / fp16 weights for compute,
fp32 gradient reduction and fp32 logits. Normalization layers are units of their own
with fp32 weights: BatchNorm's running statistics stay fp32, and a CPU batch norm refuses
bf16 weights next to fp32 statistics. Autocast stays on around the forward, to cast
activations at the seams between fp32 and reduced-precision units. fp16 uses
``ShardedGradScaler``, which agrees across ranks on whether a step overflowed (each rank
sees only its shard's gradients).

Weights must be contiguous (FSDP2 shards dimension 0 of a contiguous tensor), so the
model's weights are kept NCHW; inputs and activations stay channels-last, as with
DeepSpeed. Checkpoints hold full (unsharded) weights and the full optimizer state, keyed
by parameter name, so they load into any engine and into prediction.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from segcore.config import TrainConfig
from segcore.precision import DTYPES
from segcore.train.engines.base import Engine

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that become FSDP units, in forward order (the root is not listed).

    A U-Net's blocks (``down``, ``up``, ``dec``, in the order forward uses them);
    another model's direct children that hold parameters.
    """
    if all(hasattr(model, n) for n in ("down", "up", "dec")):
        units = list(model.down)
        for up, dec in zip(model.up, model.dec):
            units += [up, dec]
        return units
    return [m for m in model.children() if any(True for _ in m.parameters())]


def mixed_precision_policies(precision: str):
    """(policy for blocks, policy for normalization layers, policy for the root)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        plain = MixedPrecisionPolicy()
        return plain, plain, plain
    low = DTYPES[precision]
    block = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    norm = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    root = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32,
                                output_dtype=torch.float32)
    return block, norm, root


class FSDPEngine(Engine):
    """``fully_shard`` per U-Net block, the optimizer over the sharded parameters.

    Args:
        model: the bare model on the device (a ``torch.compile`` wrapper is sharded
            through to its original module).
        cfg: optimizer, schedule and precision settings.
        device: the training device.
        total_steps: optimizer steps planned (for the LR schedule).
    """

    name = "fsdp"

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device,
                 total_steps: int, log: Callable[[str], None] | None = None) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            raise RuntimeError("engine 'fsdp' needs a process group: start the run under "
                               "torchrun, or use --engine single")
        bare = getattr(model, "_orig_mod", model)
        bare.to(memory_format=torch.contiguous_format)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        block, norm, root = mixed_precision_policies(cfg.precision)
        if cfg.precision != "fp32":
            for m in bare.modules():
                if isinstance(m, _NORMS) and any(True for _ in m.parameters()):
                    fully_shard(m, mesh=mesh, mp_policy=norm)
        for unit in shard_units(bare):
            fully_shard(unit, mesh=mesh, mp_policy=block)
        fully_shard(bare, mesh=mesh, mp_policy=root)
        super().__init__(model, cfg, device, total_steps)  # optimizer over the shards
        if cfg.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device.type)

    def accumulate(self):
        """Micro-batches that do not step keep full gradients and skip the
        reduce-scatter; the last one reduces the sum."""
        return _no_gradient_sync(self.module)

    # -- evaluation -------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluation(self):
        """Gather every unit's full weights once (every rank enters together), then run
        local, collective-free forwards: ranks may hold different numbers of batches."""
        self._sync_buffers()
        fsdp_units = self._units()
        self.module.eval()
        for u in fsdp_units:
            u.set_reshard_after_forward(False)
            u.unshard()
        try:
            yield self._eval_forward
        finally:
            for u in fsdp_units:
                u.reshard()
                u.set_reshard_after_forward(True)
            self.module.train()

    def _units(self) -> list:
        from torch.distributed.fsdp import FSDPModule

        return [m for m in self.module.modules() if isinstance(m, FSDPModule)]

    def _sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics on every rank, as DDP keeps them (each rank's
        own would differ: it normalised different batches)."""
        import torch.distributed as dist

        for b in self.module.buffers():
            dist.broadcast(b, src=0)

    # -- checkpoints --------------------------------------------------------------------
    def model_state_dict(self) -> dict[str, Any]:
        """Full fp32 weights on every rank (a collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        self._sync_buffers()
        return get_model_state_dict(self.module,
                                    options=StateDictOptions(full_state_dict=True))

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        sd = {"model": self.model_state_dict(),
              "optimizer": get_optimizer_state_dict(
                  self.module, self.optimizer,
                  options=StateDictOptions(full_state_dict=True)),
              "scaler": self.scaler.state_dict()}
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Full weights (from any engine's checkpoint) and, when saved by this engine,
        the full optimizer state, re-sharded over this run's workers."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True)
        weights = {k: v.contiguous() for k, v in sd["model"].items()}
        set_model_state_dict(self.module, weights, options=opts)
        optim = sd.get("optimizer")
        # Only this engine's state is keyed by parameter name; DDP's / single's is keyed
        # by position and cannot be mapped onto shards: the optimizer then starts fresh.
        if optim and _keyed_by_name(optim):
            set_optimizer_state_dict(self.module, self.optimizer, optim, options=opts)
        if "scaler" in sd:
            self.scaler.load_state_dict(sd["scaler"])
        if self.scheduler is not None and "scheduler" in sd:
            self.scheduler.load_state_dict(sd["scheduler"])


def _keyed_by_name(optim_sd: dict[str, Any]) -> bool:
    state = optim_sd.get("state", {})
    return bool(state) and all(isinstance(k, str) for k in state)


@contextlib.contextmanager
def _no_gradient_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
