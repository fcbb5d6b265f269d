"""The U-Net family. Knows nothing about devices, DDP or DeepSpeed.

Two block styles share one encoder/decoder skeleton:

``paper``
    The reference study's network: per level two unpadded ``k x k`` convolutions (k = 2)
    with ReLU, 2x2 max-pool down, 2x2 stride-2 transposed convolution up, skip
    connections center-cropped to the decoder's size, a 1x1 head, and a final bilinear
    interpolation back to the input size. With widths (16, 32, 64) and 6 classes it has
    58,006 parameters, as in the study.
``modern``
    ``k x k`` same-padding convolutions (k = 3) with BatchNorm (or GroupNorm) and ReLU,
    the same down/up path; the output has the input's size, no interpolation. Input
    sides must be multiples of ``2 ** (depth - 1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segcore.config import ConfigError, ModelConfig


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(8, channels)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """Two convolutions with ReLU; normalized and same-padded in the modern style."""

    def __init__(self, cin: int, cout: int, kernel: int, modern: bool, norm: str) -> None:
        layers: list[nn.Module] = []
        for c_in in (cin, cout):
            if modern:
                layers += [nn.Conv2d(c_in, cout, kernel, padding=kernel // 2,
                                     bias=norm == "none"),
                           _norm(norm, cout), nn.ReLU(inplace=True)]
            else:
                layers += [nn.Conv2d(c_in, cout, kernel), nn.ReLU(inplace=True)]
        super().__init__(*layers)


def _center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    dy, dx = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., dy:dy + h, dx:dx + w]


class UNet(nn.Module):
    """U-Net with ``len(widths)`` levels (the last one is the bottleneck).

    Args:
        cfg: architecture, widths, kernel and normalization.
        out_channels: classes, or 1 for a binary (sigmoid) head.
        in_channels: image channels.
    """

    def __init__(self, cfg: ModelConfig, out_channels: int, in_channels: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.out_channels = out_channels
        modern = cfg.arch == "modern"
        norm = cfg.norm if modern else "none"
        w = cfg.widths
        self.down = nn.ModuleList()
        cin = in_channels
        for width in w:
            self.down.append(DoubleConv(cin, width, cfg.kernel, modern, norm))
            cin = width
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(len(w) - 2, -1, -1):
            self.up.append(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2))
            self.dec.append(DoubleConv(2 * w[i], w[i], cfg.kernel, modern, norm))
        self.head = nn.Conv2d(w[0], out_channels, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for up, dec in zip(self.up, self.dec):
            x = up(x)
            skip = skips.pop()
            if skip.shape[-2:] != x.shape[-2:]:
                skip = _center_crop(skip, x.shape[-2], x.shape[-1])
            x = dec(torch.cat([skip, x], dim=1))
        x = self.head(x)
        if x.shape[-2:] != size:
            # Only the paper model gets here: unpadded convolutions shrink the map.
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


def paper_output_side(side: int, depth: int, kernel: int = 2) -> int:
    """Side of the paper U-Net's pre-interpolation output for an input side (<= 0: too small)."""
    shrink = 2 * (kernel - 1)
    s = side
    for i in range(depth):
        if i:
            s //= 2
        s -= shrink
        if s <= 0:
            return s
    for _ in range(depth - 1):
        s = s * 2 - shrink
        if s <= 0:
            return s
    return s


def min_paper_side(depth: int, kernel: int = 2) -> int:
    side = 1
    while paper_output_side(side, depth, kernel) <= 0:
        side += 1
    return side


def check_input_size(cfg: ModelConfig, height: int, width: int) -> None:
    """Raise :class:`ConfigError` with a suggested fix if the model cannot take this size."""
    for name, side in (("height", height), ("width", width)):
        if cfg.arch == "modern":
            m = 2 ** (cfg.depth - 1)
            if side % m:
                lo, hi = side // m * m, (side // m + 1) * m
                raise ConfigError(
                    f"image {name} {side} does not fit the modern U-Net of depth {cfg.depth}: "
                    f"sides must be multiples of {m}; use --image-size {lo or hi} or {hi}, "
                    "or a smaller depth")
        else:
            if paper_output_side(side, cfg.depth, cfg.kernel) <= 0:
                need = min_paper_side(cfg.depth, cfg.kernel)
                raise ConfigError(
                    f"image {name} {side} is too small for the paper U-Net of depth "
                    f"{cfg.depth}: unpadded convolutions need at least {need} px; "
                    f"use --image-size {need} or more, or a smaller depth")


def valid_side_at_most(cfg: ModelConfig, side: int) -> int:
    """Largest side <= ``side`` the model accepts (used to center-crop validation images)."""
    if cfg.arch == "modern":
        m = 2 ** (cfg.depth - 1)
        return side // m * m
    return side


def build_model(cfg: ModelConfig, num_classes: int, binary: bool = False) -> UNet:
    """Build the U-Net for a class scheme (a binary scheme gets one sigmoid logit).

    The model is returned in ``channels_last`` memory format when the config asks for it,
    so no layout flip happens inside the network.
    """
    model = UNet(cfg, 1 if binary else num_classes)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def count_params(model: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
