"""Segmentation losses: cross-entropy (or BCE for a 1-channel binary head) and soft Dice.

Functional, so they test in microseconds on the CPU. Pixels labelled ``IGNORE_INDEX``
contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segcore.data.classes import IGNORE_INDEX


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, binary: bool,
                      class_weights: torch.Tensor | None = None, dice: bool = False,
                      reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (or BCE-with-logits for a 1-channel binary head), plus optional Dice.

    Pixels labelled ``IGNORE_INDEX`` contribute nothing. With ``reduction="sum"`` the
    summed loss is returned (used to reduce validation loss exactly across ranks).
    """
    logits = logits.float()
    valid = target != IGNORE_INDEX
    if binary:
        t = target.clamp(max=1).float()
        per_px = F.binary_cross_entropy_with_logits(logits[:, 0], t, reduction="none")
        if class_weights is not None:
            per_px = per_px * class_weights[target.clamp(max=1)]
        per_px = per_px * valid
        loss = per_px.sum() if reduction == "sum" else per_px.sum() / valid.sum().clamp(min=1)
    else:
        loss = F.cross_entropy(logits, target, weight=class_weights, ignore_index=IGNORE_INDEX,
                               reduction=reduction)
    if dice:
        loss = loss + dice_loss(logits, target, binary)
    return loss


def dice_loss(logits: torch.Tensor, target: torch.Tensor, binary: bool,
              eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss (1 - mean per-class Dice) over valid pixels."""
    valid = (target != IGNORE_INDEX).unsqueeze(1)
    t = target.clamp(max=(1 if binary else logits.shape[1] - 1))
    if binary:
        p = torch.sigmoid(logits)
        p = torch.cat([1 - p, p], dim=1)
        n = 2
    else:
        p = logits.softmax(dim=1)
        n = logits.shape[1]
    onehot = F.one_hot(t, n).permute(0, 3, 1, 2).to(p.dtype)
    p, onehot = p * valid, onehot * valid
    inter = (p * onehot).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()
