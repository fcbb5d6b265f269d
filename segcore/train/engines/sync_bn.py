"""BatchNorm whose training statistics cover the global batch (``--sync-bn``).

With plain BatchNorm each worker normalizes over its own share of the batch, so a
2-worker run at batch b/2 per worker does not follow the 1-worker run at batch b (the
statistics of b/2 images differ from those of b). Synchronized BatchNorm computes the
mean and variance over every worker's images, which restores that equivalence.

``torch.nn.SyncBatchNorm`` only runs on accelerators, so on the CPU (gloo) the layers
become :class:`SyncBatchNorm2d`: one differentiable all-reduce per layer in the forward
pass and one in the backward. Each rank contributes its own count, mean and sum of
squared deviations, combined exactly (Chan et al.'s parallel variance) rather than from
sums of squares, which cancel on activations with a large mean. Autograd carries the
gradient back through the all-reduce, so each worker's input gradient includes what its
images did to the statistics of the others, as torch's layer does.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.nn.functional import all_reduce


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with batch statistics over all ranks, on any device and backend.

    In eval mode, or without a process group of two or more ranks, it is plain
    BatchNorm (running statistics, no collective).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and tdist.is_available() and tdist.is_initialized()
                and tdist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        xf = x.float()  # statistics in fp32 whatever the compute dtype
        dims = (0, 2, 3)
        mean_r = xf.mean(dims)
        m2_r = (xf - mean_r.view(1, c, 1, 1)).square().sum(dims)
        mine = torch.cat([mean_r, m2_r, xf.new_tensor([x.numel() // c])])
        # An all-gather as one all-reduce: every rank fills its own row of zeros (the
        # all-reduce's backward is an all-reduce too, which gloo has).
        rank, world = tdist.get_rank(), tdist.get_world_size()
        table = all_reduce(torch.stack([mine if r == rank else torch.zeros_like(mine)
                                        for r in range(world)]))
        means, m2s, ns = table[:, :c], table[:, c:2 * c], table[:, 2 * c:]
        n = ns.sum()
        mean = (ns * means).sum(0) / n
        var = (m2s + ns * (means - mean).square()).sum(0) / n
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), float(n))
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.float().view(1, c, 1, 1) + self.bias.float().view(1, c, 1, 1)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None \
            else 1.0 / float(self.num_batches_tracked)
        # The running variance is the unbiased estimate over the global batch, as in
        # nn.BatchNorm2d over the same images in one process.
        unbiased = var * (n / max(n - 1.0, 1.0))
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``model`` synchronized across ranks, in place.

    On CUDA this is ``torch.nn.SyncBatchNorm`` (fused kernels); elsewhere
    :class:`SyncBatchNorm2d`. Parameters and buffers are the same tensors (an optimizer
    built before still holds them) and the state-dict keys do not change, so checkpoints
    load into a model with plain BatchNorm.

    Returns:
        ``model`` (or its replacement if ``model`` itself is a BatchNorm layer).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if type(model) is nn.BatchNorm2d:
        new = SyncBatchNorm2d(model.num_features, model.eps, model.momentum, model.affine,
                              model.track_running_stats, device=model.weight.device
                              if model.affine else None)
        if model.affine:
            new.weight, new.bias = model.weight, model.bias
        if model.track_running_stats:
            new.running_mean, new.running_var = model.running_mean, model.running_var
            new.num_batches_tracked = model.num_batches_tracked
        new.train(model.training)
        return new
    for name, child in model.named_children():
        converted = convert_sync_batchnorm(child, device)
        if converted is not child:
            setattr(model, name, converted)
    return model
