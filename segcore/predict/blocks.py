"""A full-size photo's class map within a memory budget: tile-aligned blocks.

Memory
------
:func:`segcore.predict.tiles.blend_tiles` accumulates ``C x H x W`` float32 outputs on the
model's device. For a 6000 x 4000 photo that is 576 MB with six classes but 2.3 GB with
the 24-class ``full`` scheme, and it grows with the image. So :func:`predict_classes`
cuts the image into *blocks aligned with the global tile grid*: each block is a run of
consecutive tile rows and tile columns, blended with ``blend_tiles`` on exactly those
tiles, and only the pixels whose every covering tile lies inside the block are kept. A
kept pixel therefore receives the same tiles, in the same order, with the same blending
weights as in one whole-image call: the class map equals whole-image ``blend_tiles`` +
:func:`segcore.metrics.logits_to_pred` (no new seams, no approximation). The price is
recomputing the tiles that straddle a block boundary; :func:`plan_blocks` picks the
layout with the fewest tiles whose device buffers fit ``max_block_mb`` (default 1 GiB).

Per block, the uint8 RGB pixels cross to the device once (3 bytes a pixel; each batch of
tiles is normalized there, a quarter of the bytes a float input would move), the blend
accumulates there, and only the block's uint8 class map comes back, once. The budget
therefore covers ``4 (C + 1) + 4`` bytes a pixel: accumulator, weight map, uint8 input
and class map. A six-class or binary 6000 x 4000 photo is one block (nothing
recomputed); the ``full`` scheme takes 2 x 2 blocks (204 tiles instead of 176). The host
holds only the uint8 photo, class map and colour map at full size (about 7 bytes a
pixel), so a larger photo adds host bytes per pixel, not ``4 (C + 1)``.

Rejected alternatives: a float16 accumulator halves the memory but does not bound it;
strips predicted on padded sub-images with their own tile grid would be cheaper to write
but put new seams (other tile positions and weights) into the map, so the result would
depend on the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from segcore.data.dataset import MEAN, STD
from segcore.predict.tiles import blend_tiles, logits_to_classes, tile_grid

__all__ = ["Block", "plan_blocks", "tile_normalizer", "predict_classes",
           "predict_class_map"]

# Device bytes a pixel besides the 4 (C + 1) of accumulator and weight map: the uint8
# RGB block and its uint8 class map.
_BLOCK_BYTES_PER_PX = 3 + 1


@dataclass(frozen=True)
class Block:
    """One piece of an image predicted in a single :func:`blend_tiles` call.

    Attributes:
        y0, y1, x0, x1: the region fed to ``blend_tiles`` (exactly some tiles of the
            whole image's grid).
        ky0, ky1, kx0, kx1: the region kept from it (image coordinates): pixels whose
            covering tiles all lie in this block. Kept regions tile the image.
        tiles: tiles predicted for this block.
    """

    y0: int
    y1: int
    x0: int
    x1: int
    ky0: int
    ky1: int
    kx0: int
    kx1: int
    tiles: int


def _axis_blocks(origins: Sequence[int], tile: int, length: int,
                 max_tiles: int) -> list[tuple[int, int, int, int, int]]:
    """Split one axis of the tile grid into runs of at most ``max_tiles`` tiles.

    Returns:
        ``[(start, end, keep_start, keep_end, n_tiles), ...]``. A pixel ``p`` is covered
        by the tiles ``k`` with ``origins[k] <= p < origins[k] + tile``; it is kept from
        the run of tiles ``i..j`` only when all of them are in the run, i.e.
        ``origins[i-1] + tile <= p < origins[j+1]``.
    """
    n = len(origins)
    if n <= max_tiles:
        return [(0, length, 0, length, n)]
    runs = []
    i, j_prev, keep_from = 0, -1, 0
    while True:
        j = max(min(i + max_tiles - 1, n - 1), j_prev + 1)
        # Widen until some pixel past this run's first tile is complete, or no next run
        # could start after i (large overlaps need more tiles per run than the budget).
        while j < n - 1 and origins[j + 1] < origins[i] + tile:
            j += 1
        keep_to = origins[j + 1] if j < n - 1 else length
        runs.append((origins[i], min(origins[j] + tile, length), keep_from, keep_to,
                     j - i + 1))
        if j == n - 1:
            return runs
        # The next run starts as late as possible while its first kept pixel (the first
        # one not covered by its predecessor tile) is not after keep_to.
        i = max(k for k in range(i + 1, j + 2) if origins[k - 1] + tile <= keep_to)
        j_prev, keep_from = j, keep_to


def plan_blocks(height: int, width: int, tile: int, overlap: float | int,
                num_out_channels: int, max_block_mb: float) -> list[Block]:
    """Blocks whose kept regions tile the image, each within the memory budget.

    The budget covers ``blend_tiles``'s accumulator and weight map (``4 (C + 1)`` bytes
    a pixel), the uint8 input block and its class map (4 bytes a pixel). Among the
    layouts that fit (runs of ``kx`` tile columns, each as many tile rows as then fit),
    the one that predicts the fewest tiles wins: usually full-width strips, whose only
    recomputed tiles are a row or two per strip boundary. When nothing fits (a budget
    smaller than the few tiles one boundary needs), the smallest blocks are taken and the
    budget is exceeded rather than failing.

    Args:
        height, width: image size.
        tile, overlap: as for :func:`segcore.predict.tiles.tile_grid`.
        num_out_channels: model outputs ``C``.
        max_block_mb: MiB per block.

    Returns:
        Blocks in row-major order.
    """
    origins = tile_grid(height, width, tile, overlap)
    ys = sorted({y for y, _ in origins})
    xs = sorted({x for _, x in origins})
    per_px = 4 * (num_out_channels + 1) + _BLOCK_BYTES_PER_PX
    budget_px = max_block_mb * 2 ** 20 / per_px

    def tiles_fitting(side_px: float, axis: Sequence[int]) -> int:
        stride = axis[1] - axis[0] if len(axis) > 1 else tile
        return max(1, int((side_px - tile) // stride) + 1) if side_px >= tile else 1

    if height * width <= budget_px:
        rows = _axis_blocks(ys, tile, height, len(ys))
        cols = _axis_blocks(xs, tile, width, len(xs))
    else:
        best: tuple | None = None
        for kx in range(len(xs), 0, -1):
            cols = _axis_blocks(xs, tile, width, kx)
            bw = max(c[1] - c[0] for c in cols)
            rows = _axis_blocks(ys, tile, height, tiles_fitting(budget_px / bw, ys))
            area = max(r[1] - r[0] for r in rows) * bw
            tiles = sum(r[4] for r in rows) * sum(c[4] for c in cols)
            fits = area <= budget_px
            key = (not fits, tiles if fits else area)
            if best is None or key < best[0]:
                best = (key, rows, cols)
        _, rows, cols = best
    return [Block(y0, y1, x0, x1, ky0, ky1, kx0, kx1, ny * nx)
            for y0, y1, ky0, ky1, ny in rows for x0, x1, kx0, kx1, nx in cols]


def tile_normalizer(device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 ``[B, 3, h, w]`` tiles -> normalized float32, on ``device``.

    The same operations, in the same order, as :func:`segcore.data.dataset.normalize_image`
    (so the values are bitwise those of training), applied per batch on the device
    instead of to a float copy of the whole block on the host.
    """
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def normalize_tiles(batch: torch.Tensor) -> torch.Tensor:
        # In place: one float temporary per batch; the same operations as (x - m) / s.
        return batch.float().div_(255.0).sub_(mean).div_(std)

    return normalize_tiles


def _block_class_maps(model_fn: Callable[[torch.Tensor], torch.Tensor],
                      block_pixels: Callable[[Block], torch.Tensor], height: int, width: int,
                      num_out_channels: int, *, tile: int, overlap: float | int,
                      batch_size: int, device: torch.device,
                      autocast_dtype: torch.dtype | None, channels_last: bool,
                      threshold: float, max_block_mb: float,
                      progress: Callable[[int, int], None] | None
                      ) -> Iterator[tuple[Block, torch.Tensor]]:
    """Per block, its kept region's uint8 class map, on ``device``.

    ``block_pixels(block)`` gives the block's uint8 ``[3, h, w]`` pixels on ``device``.
    The one loop behind :func:`predict_classes` (host map) and :func:`predict_class_map`
    (device map), so both give the same classes.
    """
    blocks = plan_blocks(height, width, tile, overlap, num_out_channels, max_block_mb)
    total = sum(b.tiles for b in blocks)
    normalize_tiles = tile_normalizer(device)
    done = 0
    for b in blocks:
        expect = tile_grid(b.y1 - b.y0, b.x1 - b.x0, tile, overlap)
        if len(expect) != b.tiles:  # the block must reproduce the global grid exactly
            raise RuntimeError(f"internal: block {b} tiles {len(expect)} != {b.tiles}")
        sub = block_pixels(b)
        step = (None if progress is None
                else (lambda d, _t, base=done: progress(base + d, total)))
        logits = blend_tiles(model_fn, sub, num_out_channels, tile=tile, overlap=overlap,
                             batch_size=batch_size, device=device,
                             autocast_dtype=autocast_dtype, channels_last=channels_last,
                             progress=step, transform=normalize_tiles)
        del sub
        keep = logits[:, b.ky0 - b.y0:b.ky1 - b.y0, b.kx0 - b.x0:b.kx1 - b.x0]
        yield b, logits_to_classes(keep, threshold)
        del logits, keep
        done += b.tiles


def predict_classes(model_fn: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray,
                    num_out_channels: int, *, tile: int = 512, overlap: float | int = 0.25,
                    batch_size: int = 4, device: torch.device | str = "cpu",
                    autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                    threshold: float = 0.5, max_block_mb: float = 1024.0,
                    progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Class map of a full-size photo: blockwise :func:`blend_tiles` on ``device``.

    Equal to one whole-image ``blend_tiles`` call followed by
    :func:`segcore.metrics.logits_to_pred` (see the module docstring), with device memory
    bounded by ``max_block_mb`` (plus one batch) and host memory by the uint8 image and
    map. One host -> device copy (uint8 pixels) and one device -> host copy (uint8
    classes) per block.

    Args:
        model_fn: ``[B, 3, tile, tile] -> [B, C, tile, tile]`` logits (eval mode).
        image: RGB uint8 ``(H, W, 3)``; normalized on the device, batch by batch.
        num_out_channels: ``C`` (1 for a binary sigmoid head).
        tile, overlap, batch_size, device, autocast_dtype, channels_last: passed to
            ``blend_tiles``.
        threshold: for ``C == 1``: class 1 where ``sigmoid(logit) > threshold``.
        max_block_mb: memory per block (see :func:`plan_blocks`).
        progress: ``(tiles_done, tiles_total)`` over the whole image.

    Returns:
        uint8 ``(H, W)`` class indices.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be RGB uint8 (H, W, 3), got {image.dtype} "
                         f"{image.shape}")
    device = torch.device(device)
    H, W = image.shape[:2]

    def block_pixels(b: Block) -> torch.Tensor:
        # A strided view of the photo; on a CPU device no pixel is copied here.
        return torch.from_numpy(image[b.y0:b.y1, b.x0:b.x1]).to(device).permute(2, 0, 1)

    classes = np.empty((H, W), dtype=np.uint8)
    for b, cls in _block_class_maps(
            model_fn, block_pixels, H, W, num_out_channels, tile=tile, overlap=overlap,
            batch_size=batch_size, device=device, autocast_dtype=autocast_dtype,
            channels_last=channels_last, threshold=threshold, max_block_mb=max_block_mb,
            progress=progress):
        classes[b.ky0:b.ky1, b.kx0:b.kx1] = cls.cpu().numpy()
    return classes


def predict_class_map(model_fn: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                      num_out_channels: int, *, tile: int = 512,
                      overlap: float | int = 0.25, batch_size: int = 4,
                      device: torch.device | str = "cpu",
                      autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                      threshold: float = 0.5, max_block_mb: float = 1024.0,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """:func:`predict_classes` for a photo given as a tensor, the map left on ``device``.

    The pipelined folder run decodes photos ahead of the model straight to the device
    (nvJPEG, or an upload in the reader thread) and counts classes there, so the map
    stays where it was made; only it (1 byte a pixel) and the counts come back. Besides
    the block budget, the device holds the whole photo (3 bytes a pixel) and its map (1).

    Args:
        pixels: RGB uint8 ``[3, H, W]`` on any device (blocks move to ``device``; a view
            of a host array costs no copy on a CPU device).
        model_fn, num_out_channels, tile, overlap, batch_size, device, autocast_dtype,
            channels_last, threshold, max_block_mb, progress: as for
            :func:`predict_classes`.

    Returns:
        uint8 ``[H, W]`` class indices on ``device``, equal to :func:`predict_classes`.
    """
    if pixels.dim() != 3 or pixels.shape[0] != 3 or pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be RGB uint8 [3, H, W], got {pixels.dtype} "
                         f"{tuple(pixels.shape)}")
    device = torch.device(device)
    H, W = pixels.shape[1:]
    classes = torch.empty(H, W, dtype=torch.uint8, device=device)
    for b, cls in _block_class_maps(
            model_fn, lambda b: pixels[:, b.y0:b.y1, b.x0:b.x1].to(device), H, W,
            num_out_channels, tile=tile, overlap=overlap, batch_size=batch_size,
            device=device, autocast_dtype=autocast_dtype, channels_last=channels_last,
            threshold=threshold, max_block_mb=max_block_mb, progress=progress):
        classes[b.ky0:b.ky1, b.kx0:b.kx1] = cls
    return classes
