"""Sliding-window (tiled) inference for full-resolution drone images.

A 6000 x 4000 image does not fit through a U-Net in one piece, and a model trained on
crops is most accurate on inputs of its training size. :func:`blend_tiles` covers the
image with overlapping tiles (the last tile of each row and column flush with the edge),
runs them in batches and blends the outputs with a smooth window, so that predictions
near a tile border, where the network saw little context, count less than those from
the middle of a neighbouring tile.

The blend happens where the model runs: the weighted outputs accumulate on the model's
device, so a batch of tile outputs never crosses to the host; the caller copies the
result (or, cheaper, its uint8 class map) once. Memory is bounded independently of the
number of tiles: the accumulator (``C x H x W`` float32), one weight map (``H x W``) and
one batch of tiles, all on the device. Tiles are sliced from the image one batch at a
time, never unfolded all at once. :mod:`segcore.predict.blocks` bounds the accumulator
too, by predicting a large photo in blocks.

Logits become classes through :func:`segcore.metrics.logits_to_pred` only (argmax;
``sigmoid > threshold`` for a 1-channel binary head), as in training's evaluation.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segcore.metrics import logits_to_pred

__all__ = ["tile_grid", "window_2d", "blend_tiles", "predict_tiled", "logits_to_classes",
           "predict_image"]

WINDOWS = ("hann", "triangle", "flat")
_CLASS_ROWS = 256  # rows per logits -> classes chunk: bounds the int64 temporaries


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} = {v!r}: give one int or (height, width)")
        a, b = v
    else:
        a = b = v
    for x in (a, b):
        if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
            raise ValueError(f"{name} = {v!r} must be a positive int or (height, width)")
    return int(a), int(b)


def _overlap_px(overlap: float | int, tile: int) -> int:
    """Overlap in pixels: a float is a fraction of the tile in [0, 1), an int is pixels."""
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)):
        raise ValueError(f"overlap = {overlap!r} must be a fraction (float) or pixels (int)")
    if isinstance(overlap, float):
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap = {overlap!r}: a fractional overlap must be in [0, 1)")
        px = int(round(overlap * tile))
    else:
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap = {overlap!r} px must be in [0, tile) = [0, {tile})")
        px = overlap
    return min(px, tile - 1)  # stride >= 1 even when rounding reaches the tile size


def _axis_origins(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]  # one (padded) tile
    last = length - tile
    stride = tile - overlap
    pos = list(range(0, last + 1, stride))
    if pos[-1] != last:
        pos.append(last)  # flush with the edge rather than running past it
    return pos


def tile_grid(height: int, width: int, tile: int | Sequence[int] = 512,
              overlap: float | int = 0.25) -> list[tuple[int, int]]:
    """Top-left corners of the tiles covering an image, row-major.

    Args:
        height, width: image size.
        tile: tile side, or ``(tile_h, tile_w)``.
        overlap: fraction of the tile in [0, 1) (float) or pixels (int) shared by
            neighbouring tiles; the last tile of a row/column may overlap more.

    Returns:
        ``[(y, x), ...]``; along an axis shorter than the tile there is one origin, 0
        (that tile is padded).
    """
    th, tw = _pair(tile, "tile")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} must be positive")
    ys = _axis_origins(height, th, _overlap_px(overlap, th))
    xs = _axis_origins(width, tw, _overlap_px(overlap, tw))
    return [(y, x) for y in ys for x in xs]


def _window_1d(n: int, kind: str, floor: float) -> torch.Tensor:
    if kind == "flat":
        return torch.ones(n)
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # symmetric, never exactly 0
    w = torch.sin(math.pi * t) ** 2 if kind == "hann" else 1.0 - (2.0 * t - 1.0).abs()
    return (floor + (1.0 - floor) * w).float()


def window_2d(tile_h: int, tile_w: int, kind: str = "hann", floor: float = 0.05) -> torch.Tensor:
    """Blending weights of one tile, ``(tile_h, tile_w)`` float32.

    Args:
        tile_h, tile_w: tile size.
        kind: ``hann`` (sin^2 ramp), ``triangle`` or ``flat`` (plain averaging).
        floor: smallest weight, in (0, 1]: pixels on a tile border still count, so a
            pixel covered by one tile only (an image corner) keeps a positive weight.

    Returns:
        Outer product of two 1-D windows.
    """
    if kind not in WINDOWS:
        raise ValueError(f"window = {kind!r}; choose one of {', '.join(WINDOWS)}")
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"window floor = {floor!r} must be in (0, 1]")
    return torch.outer(_window_1d(tile_h, kind, floor), _window_1d(tile_w, kind, floor))


def _pad_reflect(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Reflect-pad by any amount (F.pad's reflect needs pad < size, so pad in steps)."""
    while top or bottom or left or right:
        h, w = x.shape[-2:]
        step = [min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1)]
        if not any(step):  # a 1-pixel axis cannot reflect: repeat it instead
            return F.pad(x, (left, right, top, bottom), mode="replicate")
        x = F.pad(x, step, mode="reflect")
        left, right, top, bottom = (a - s for a, s in zip((left, right, top, bottom), step))
    return x



def blend_tiles(model_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                num_out_channels: int, tile: int | Sequence[int] = 512,
                overlap: float | int = 0.25, batch_size: int = 4,
                device: torch.device | str | None = None,
                autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                progress: Callable[[int, int], None] | None = None,
                window: str = "hann", window_floor: float = 0.05,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
    """Run a dense model over a large image tile by tile and blend the tiles on ``device``.

    Args:
        model_fn: ``batch [B, Cin, th, tw] -> [B, C, th, tw]`` (a module in eval mode,
            already on ``device``, or any callable). Its outputs are blended as they are:
            logits, or probabilities if it applies a softmax itself.
        image: ``[Cin, H, W]`` tensor on any device: float and normalized, or whatever
            ``transform`` turns into the model's input.
        num_out_channels: ``C``, channels the model returns.
        tile: tile side or ``(tile_h, tile_w)``; an image smaller than a tile is
            reflect-padded to it and the output cropped back.
        overlap: fraction of the tile in [0, 1) (float) or pixels (int).
        batch_size: tiles per forward pass.
        device: where tiles run and blend; default the image's device.
        autocast_dtype: run the model under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` / ``torch.float16``); ``None`` for full precision.
        channels_last: feed tiles in NHWC memory format (match a channels_last model).
        progress: called as ``progress(tiles_done, tiles_total)`` after each batch.
        window: blending window, ``hann`` (default), ``triangle`` or ``flat``.
        window_floor: smallest blending weight, in (0, 1].
        transform: applied to each batch of tiles once it is on ``device`` (e.g. uint8
            -> normalized float, so that only a quarter of the bytes cross to the device).

    Returns:
        ``[C, H, W]`` float32 tensor on ``device``: the weighted mean of the tile outputs.

    Raises:
        ValueError: bad arguments, a module in training mode, or a model output of the
            wrong shape.
    """
    if image.dim() != 3 or (transform is None and not image.is_floating_point()):
        raise ValueError(f"image must be a float [C, H, W] tensor, got {image.dtype} "
                         f"{tuple(image.shape)}")
    if isinstance(num_out_channels, bool) or not isinstance(num_out_channels, int) \
            or num_out_channels <= 0:
        raise ValueError(f"num_out_channels = {num_out_channels!r} must be a positive int")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size = {batch_size!r} must be a positive int")
    if isinstance(model_fn, nn.Module) and model_fn.training:
        # Batch norm in training mode would normalize with per-batch statistics (and
        # update running stats): the result would depend on how tiles are batched.
        raise ValueError("model is in training mode; call model.eval() before inference")
    th, tw = _pair(tile, "tile")
    _, H, W = image.shape
    origins = tile_grid(H, W, (th, tw), overlap)
    total = len(origins)
    device = torch.device(device) if device is not None else image.device
    C = num_out_channels

    # Image axes shorter than the tile: every tile spans the whole axis and is padded
    # evenly on both sides, so both image borders see reflected context.
    vh, vw = min(H, th), min(W, tw)
    pt, pl = (th - vh) // 2, (tw - vw) // 2
    pb, pr = th - vh - pt, tw - vw - pl
    weight = window_2d(th, tw, window, window_floor)[pt:pt + vh, pl:pl + vw].to(device)

    # Allocated outside inference_mode so the caller gets ordinary tensors (in-place ops
    # on inference tensors are refused outside inference mode).
    out = torch.zeros(C, H, W, dtype=torch.float32, device=device)
    wsum = torch.zeros(H, W, dtype=torch.float32, device=device)
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())

    with torch.inference_mode():
        for start in range(0, total, batch_size):
            chunk = origins[start:start + batch_size]
            # One batch copy (bounded by batch_size), moved to the device as one transfer.
            batch = torch.stack([image[:, y:y + vh, x:x + vw] for y, x in chunk])
            batch = batch.to(device, non_blocking=True)
            if transform is not None:
                batch = transform(batch)
            if pt or pb or pl or pr:
                batch = _pad_reflect(batch, pt, pb, pl, pr)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with amp:
                pred = model_fn(batch)
            expect = (len(chunk), C, th, tw)
            if tuple(pred.shape) != expect:
                raise ValueError(f"model returned {tuple(pred.shape)} for a batch of "
                                 f"{tuple(batch.shape)}; expected {expect}")
            pred = pred[:, :, pt:pt + vh, pl:pl + vw].float()
            for (y, x), p in zip(chunk, pred):
                out[:, y:y + vh, x:x + vw].addcmul_(p, weight)
                wsum[y:y + vh, x:x + vw].add_(weight)
            if progress is not None:
                progress(start + len(chunk), total)
    # Every pixel is covered and every weight >= floor > 0, so the division is safe.
    return out.div_(wsum)


def predict_tiled(model_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                  num_out_channels: int, **kwargs) -> torch.Tensor:
    """:func:`blend_tiles`, with the blended outputs copied to the host once.

    Args:
        model_fn, image, num_out_channels, **kwargs: as for :func:`blend_tiles`
            (``image`` float and normalized unless a ``transform`` is given).

    Returns:
        ``[C, H, W]`` float32 tensor on the CPU.
    """
    return blend_tiles(model_fn, image, num_out_channels, **kwargs).cpu()


def logits_to_classes(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Class map of ``[C, H, W]`` logits by :func:`segcore.metrics.logits_to_pred`.

    Computed on the logits' device in row chunks, so the int64 temporaries stay small
    (12 MB for a 6000-pixel-wide image) whatever the image height.

    Returns:
        uint8 ``[H, W]`` on the logits' device.

    Raises:
        ValueError: more than 256 classes (they do not fit uint8).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [C, H, W], got {tuple(logits.shape)}")
    if logits.shape[0] > 256:
        raise ValueError(f"{logits.shape[0]} classes do not fit a uint8 class map")
    H, W = logits.shape[1:]
    classes = torch.empty(H, W, dtype=torch.uint8, device=logits.device)
    for r in range(0, H, _CLASS_ROWS):
        classes[r:r + _CLASS_ROWS] = logits_to_pred(logits[None, :, r:r + _CLASS_ROWS],
                                                    threshold)[0]
    return classes


def predict_image(model_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                  num_out_channels: int, threshold: float = 0.5, return_probs: bool = False,
                  **tiled_kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Class map of a full image via :func:`blend_tiles` and :func:`logits_to_classes`.

    Args:
        model_fn, image, num_out_channels: as for :func:`blend_tiles`; the model
            returns logits.
        threshold: for ``C == 1`` (binary sigmoid head), class 1 where
            ``sigmoid(logit) > threshold``.
        return_probs: also return probabilities (softmax over channels, or the sigmoid
            for ``C == 1``), ``[C, H, W]`` float32 on the CPU.
        **tiled_kwargs: ``tile``, ``overlap``, ``batch_size``, ``device``, ... passed on.

    Returns:
        ``[H, W]`` uint8 class map on the CPU, or ``(class_map, probs)``.
    """
    if num_out_channels > 256:
        raise ValueError(f"{num_out_channels} classes do not fit a uint8 class map")
    logits = blend_tiles(model_fn, image, num_out_channels, **tiled_kwargs)
    classes = logits_to_classes(logits, threshold).cpu()
    if not return_probs:
        return classes
    probs = torch.sigmoid(logits) if num_out_channels == 1 else torch.softmax(logits, dim=0)
    return classes, probs.cpu()
