"""Full-resolution prediction over a folder of drone photos, and its flood outputs.

``launch/predict.py`` calls :func:`predict_checkpoint`: load a training checkpoint with
the configuration saved inside it, run sliding-window inference on every image of a
folder, and write per image a class map, a colour map, an overlay and the surface
statistics of :mod:`segcore.flood` (impervious fraction, composite runoff coefficient),
plus an area-weighted ``ALL`` row for the folder and a summary figure.
:func:`predict_folder` does the same for any model callable (tests use an oracle).

Memory
------
:func:`segcore.infer.predict_tiled` accumulates ``C x H x W`` float32 outputs. For a
6000 x 4000 photo that is 576 MB with six classes but 2.3 GB with the 24-class ``full``
scheme (plus the normalized float image, 288 MB), and it grows with the image. So
:func:`predict_classes` cuts the image into *blocks aligned with the global tile grid*:
each block is a run of consecutive tile rows and tile columns, predicted with
``predict_tiled`` on exactly those tiles, and only the pixels whose every covering tile
lies inside the block are kept. A kept pixel therefore receives the same tiles, in the
same order, with the same blending weights as in one whole-image call: the class map
equals whole-image ``predict_tiled`` + argmax (no new seams, no approximation). The price
is recomputing the tiles that straddle a block boundary; :func:`plan_blocks` picks the
layout with the fewest tiles whose accumulator + normalized input fit ``max_block_mb``
(default 1 GiB). A six-class or binary 6000 x 4000 photo is one block (nothing
recomputed); the ``full`` scheme takes 2 x 2 blocks (204 tiles instead of 176). Only the
uint8 photo, class map and colour map are held at full size (about 7 bytes a pixel), so
the peak stays near 2 GB whatever the scheme, and a larger photo adds bytes per pixel,
not ``4 (C + 1) + 12``: blocks keep the float buffers within the budget.

Rejected alternatives: a float16 accumulator halves the memory but does not bound it
(and needs a second tiling loop beside ``predict_tiled``); strips predicted on padded
sub-images with their own tile grid would be cheaper to write but put new seams (other
tile positions and weights) into the map, so the result would depend on the budget.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from segcore.config import ConfigError, RunConfig
from segcore.data.classes import SDD_NAMES, ClassScheme, scheme as make_scheme
from segcore.data.classes import IGNORE_INDEX
from segcore.data.dataset import normalize_image as normalize  # public here too
from segcore.io import write_bytes_atomic
from segcore.predict.flood import PropertyTable, aggregate, load_properties, surface_stats
from segcore.predict.tiles import predict_tiled, tile_grid

__all__ = [
    "IMAGE_EXTS", "MASK_EXTS", "TRUTH_KINDS", "PRECISIONS", "PredictError",
    "ImageReadError", "PredictSettings", "LoadedModel", "Block", "Hooks", "FolderResult",
    "load_model", "list_images", "find_truth", "read_image", "read_truth", "normalize",
    "plan_blocks", "predict_classes", "overlay", "image_row", "predict_folder",
    "predict_checkpoint", "plot_summary",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
MASK_EXTS = (".png", ".tif", ".tiff", ".bmp")
# target: masks hold indices of the checkpoint's scheme; sdd: 24-class SDD label indices,
# remapped to the scheme exactly as in training.
TRUTH_KINDS = ("target", "sdd")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
# Pixel modes whose values are not 8-bit colours: convert("RGB") would clip them.
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ARGMAX_ROWS = 256  # rows per argmax chunk: bounds the int64 temporaries
_STAT_KEYS = ("unknown_fraction", "impervious_fraction", "pervious_fraction",
              "water_fraction", "C_low", "C_typical", "C_high")


class PredictError(ValueError):
    """Bad input for prediction (checkpoint, folders, scheme mismatch); one-line message."""


class ImageReadError(OSError):
    """One image cannot be decoded; the folder run reports and skips it."""


@dataclass(frozen=True)
class PredictSettings:
    """How images are predicted and drawn.

    Attributes:
        tile: tile side in pixels (the model's training crop or a multiple of it).
        overlap: fraction of a tile shared with its neighbour, in [0, 1).
        batch_size: tiles per forward pass.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast, CUDA only).
        threshold: binary scheme only: ``paved-area`` where ``sigmoid(logit) > threshold``.
        channels_last: feed NHWC tiles; ``None`` follows the checkpoint's config.
        max_block_mb: memory for one block's accumulator and normalized input (MiB).
        overlay_max_side: overlays are downscaled to this long side (0: full size).
        overlay_alpha: opacity of the colour map in the overlay.
        max_image_pixels: larger images are skipped (PIL's decompression-bomb guard is
            raised to this for the duration of a read, never globally).
    """

    tile: int = 512
    overlap: float = 0.25
    batch_size: int = 4
    device: str = "auto"
    precision: str = "fp32"
    threshold: float = 0.5
    channels_last: bool | None = None
    max_block_mb: float = 1024.0
    overlay_max_side: int = 2048
    overlay_alpha: float = 0.5
    max_image_pixels: int = 400_000_000

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise ConfigError(f"predict.{name} = {v!r} must be an integer "
                                  f"{'>= 0' if allow_zero else '> 0'}")

        positive_int("tile")
        positive_int("batch_size")
        positive_int("overlay_max_side", allow_zero=True)
        positive_int("max_image_pixels")
        if not (isinstance(self.overlap, (int, float)) and 0.0 <= self.overlap < 1.0):
            raise ConfigError(f"predict.overlap = {self.overlap!r} must be a fraction of the "
                              "tile in [0, 1), e.g. 0.25")
        if self.device not in DEVICES:
            raise ConfigError(f"predict.device = {self.device!r} is not valid; choose one "
                              f"of: {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"predict.precision = {self.precision!r} is not valid; choose "
                              f"one of: {', '.join(PRECISIONS)}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"predict.threshold = {self.threshold!r} must be in (0, 1)")
        if not self.max_block_mb > 0:
            raise ConfigError(f"predict.max_block_mb = {self.max_block_mb!r} must be > 0")
        if not 0.0 <= self.overlay_alpha <= 1.0:
            raise ConfigError(f"predict.overlay_alpha = {self.overlay_alpha!r} must be in "
                              "[0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Hooks:
    """Progress callbacks (the launcher draws tqdm bars with them; all optional).

    Attributes:
        log: one-line messages (a skipped image, a missing truth mask).
        image_started: ``(index, total, name, tiles)`` once an image is decoded.
        tiles_done: ``(done, total)`` tiles of the current image.
        image_finished: ``(index, total, row_or_None)``; ``None`` for a skipped image.
    """

    log: Callable[[str], None] | None = None
    image_started: Callable[[int, int, str, int], None] | None = None
    tiles_done: Callable[[int, int], None] | None = None
    image_finished: Callable[[int, int, dict[str, Any] | None], None] | None = None

    def say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)


@dataclass
class FolderResult:
    """What a folder run produced.

    Attributes:
        rows: one row per predicted image (the CSV rows without ``ALL``).
        all_row: the area-weighted ``ALL`` row (``None`` when no image was predicted).
        skipped: ``[{"image": name, "error": message}, ...]``.
        out: the output folder.
        files: paths written.
    """

    rows: list[dict[str, Any]]
    all_row: dict[str, Any] | None
    skipped: list[dict[str, str]]
    out: Path
    files: list[Path] = field(default_factory=list)

    @property
    def images_done(self) -> int:
        return len(self.rows)


# --------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    """A checkpoint's model, ready for inference.

    Attributes:
        model: the U-Net in eval mode, on ``device``.
        cfg: the configuration saved in the checkpoint.
        scheme: its class scheme.
        num_out_channels: model outputs (1 for the binary sigmoid head).
        device: where the model runs.
        epoch: the checkpoint's epoch.
        path: the checkpoint file.
    """

    model: torch.nn.Module
    cfg: RunConfig
    scheme: ClassScheme
    num_out_channels: int
    device: torch.device
    epoch: Any
    path: Path


def _one_line(text: str, limit: int = 400) -> str:
    s = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda, but no CUDA device is available; use --device "
                           "cpu or auto")
    return torch.device(name)


def _strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    # Weights saved from a compiled or DDP-wrapped module carry a wrapper prefix.
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Build the model described by a checkpoint's saved config and load its weights.

    Args:
        path: ``checkpoint.pt`` written by a training run.
        device: where to put the model.

    Returns:
        A :class:`LoadedModel` (model in eval mode).

    Raises:
        PredictError: a missing or unreadable file, a file that is not a segbench
            checkpoint, an invalid saved config, class names that differ from the
            config's scheme, or weights that do not fit the saved architecture.
    """
    from segcore.model.unet import build_model
    from segcore.train.checkpoint import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise PredictError(f"checkpoint {path} does not exist")
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except Exception as e:  # torch.load raises many types for a damaged or foreign file
        raise PredictError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                           f"{_one_line(e, 200)})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or not isinstance(
            ckpt.get("engine"), dict) or "model" not in ckpt["engine"]:
        raise PredictError(f"checkpoint {path} is not a segbench training checkpoint (it "
                           "needs 'config' and 'engine' -> 'model'; see segcore/train.py)")
    try:
        cfg = RunConfig.from_dict(ckpt["config"])
    except (ConfigError, TypeError) as e:
        raise PredictError(f"checkpoint {path} holds an invalid config: "
                           f"{_one_line(e)}") from None
    sch = make_scheme(cfg.data.class_scheme)
    names = ckpt.get("class_names")
    if names is not None and tuple(names) != sch.names:
        raise PredictError(f"checkpoint {path}: its class_names {list(names)} are not those "
                           f"of its config's {sch.name!r} scheme {list(sch.names)}")
    model = build_model(cfg.model, sch.num_classes, binary=sch.is_binary)
    try:
        model.load_state_dict(_strip_prefixes(ckpt["engine"]["model"]))
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise PredictError(
            f"checkpoint {path} does not match its saved config (arch/widths/classes: "
            f"{cfg.model.arch}, widths {list(cfg.model.widths)}, {sch.name} with "
            f"{sch.num_classes} classes): {_one_line(e, 300)}") from None
    device = torch.device(device)
    model = model.to(device).eval()
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return LoadedModel(model, cfg, sch, 1 if sch.is_binary else sch.num_classes, device,
                       ckpt.get("epoch"), path)


# --------------------------------------------------------------------------- files


def list_images(images: str | Path) -> list[Path]:
    """Image files of a folder (sorted; hidden files skipped), or a single image file.

    Raises:
        PredictError: a missing path, an empty folder, or two images sharing a stem
            (their outputs would overwrite each other).
    """
    images = Path(images)
    if images.is_file():
        return [images]
    if not images.is_dir():
        raise PredictError(f"images folder {images} does not exist")
    found = sorted(p for p in images.iterdir()
                   if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_EXTS)
    if not found:
        raise PredictError(f"no images ({', '.join(IMAGE_EXTS)}) in {images}")
    stems: dict[str, list[str]] = {}
    for p in found:
        stems.setdefault(p.stem, []).append(p.name)
    dup = [v for v in stems.values() if len(v) > 1]
    if dup:
        raise PredictError(f"images in {images} share a file stem, so their outputs would "
                           f"collide: {dup[:5]}; rename or move them")
    return found


def find_truth(truth_dir: str | Path, images: Sequence[Path]) -> dict[str, Path]:
    """Truth mask per image stem: ``<stem>.png`` (or .tif/.tiff/.bmp) in ``truth_dir``.

    Raises:
        PredictError: the folder is missing or holds no mask for any image.
    """
    truth_dir = Path(truth_dir)
    if not truth_dir.is_dir():
        raise PredictError(f"truth folder {truth_dir} does not exist")
    out = {}
    for img in images:
        for ext in MASK_EXTS:
            for cand in (truth_dir / f"{img.stem}{ext}", truth_dir / f"{img.stem}{ext.upper()}"):
                if cand.is_file():
                    out[img.stem] = cand
                    break
            if img.stem in out:
                break
    if not out:
        raise PredictError(f"truth folder {truth_dir} has no mask named like an image "
                           f"(<stem>{'|'.join(MASK_EXTS)}, e.g. {images[0].stem}.png)")
    return out


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Raise PIL's decompression-bomb limit for one read, then restore it.

    PIL warns above ``MAX_IMAGE_PIXELS`` and refuses above twice that; the caller checks
    ``max_pixels`` itself, so PIL's own warning is silenced here.
    """
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def image_size(path: Path, max_pixels: int) -> tuple[int, int] | None:
    """``(width, height)`` from the header only, or ``None`` when it cannot be read."""
    try:
        with _pixel_limit(max_pixels), Image.open(path) as im:
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def read_image(path: str | Path, max_pixels: int = 400_000_000) -> np.ndarray:
    """Decode a photo to RGB uint8 ``(H, W, 3)`` exactly as training reads it.

    Raises:
        ImageReadError: not an image, truncated, too large, or not 8-bit (the message
            does not repeat the path).
    """
    path = Path(path)
    try:
        with _pixel_limit(max_pixels), Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageReadError(f"{w}x{h} is larger than the limit of "
                                     f"{max_pixels} pixels (--max-image-pixels)")
            if im.mode in _HIGH_DEPTH_MODES:
                raise ImageReadError(f"{im.mode} pixels (more than 8 bits) are not "
                                     "supported; convert to 8-bit RGB")
            # Same conversion as DatasetIndex.load_image, so inputs match training;
            # np.array (not asarray) gives a writable array torch can wrap.
            return np.array(im.convert("RGB"))
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL raises OSError for unknown/truncated files, SyntaxError for some broken
        # headers, ValueError for odd modes.
        raise ImageReadError(f"cannot decode ({type(e).__name__}: "
                             f"{_one_line(e, 200)})") from None


def read_truth(path: str | Path, sch: ClassScheme, kind: str = "target",
               max_pixels: int = 400_000_000) -> np.ndarray:
    """A truth mask as target indices of ``sch`` (``IGNORE_INDEX`` = 255 kept).

    Args:
        path: single-channel index mask (PNG/TIFF, mode L, P or 16-bit).
        sch: the checkpoint's class scheme.
        kind: ``target`` (values are indices of ``sch``) or ``sdd`` (24-class Semantic
            Drone Dataset labels, remapped through the scheme's table as in training).

    Returns:
        uint8 ``(H, W)``.

    Raises:
        PredictError: unreadable, a colour image, or values outside the scheme.
    """
    if kind not in TRUTH_KINDS:
        raise PredictError(f"truth kind {kind!r} is not valid; choose one of "
                           f"{', '.join(TRUTH_KINDS)}")
    path = Path(path)
    try:
        with _pixel_limit(max_pixels), Image.open(path) as im:
            if im.mode not in ("L", "P", "1", *_HIGH_DEPTH_MODES):
                raise PredictError(f"truth mask {path} is a {im.mode} image; give index masks "
                                   "(one class value per pixel, mode L or P)")
            arr = np.asarray(im)
    except PredictError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise PredictError(f"truth mask {path} cannot be read ({type(e).__name__}: "
                           f"{_one_line(e, 200)})") from None
    arr = arr.astype(np.int64, copy=False)
    n = len(SDD_NAMES) if kind == "sdd" else sch.num_classes
    bad = np.unique(arr[((arr < 0) | (arr >= n)) & (arr != IGNORE_INDEX)])
    if bad.size:
        hint = ("; if the masks hold 24-class SDD labels, pass --truth-kind sdd"
                if kind == "target" and bad.max() < len(SDD_NAMES) else "")
        raise PredictError(f"truth mask {path} holds value(s) {bad[:10].tolist()} outside the "
                           f"{'SDD labels' if kind == 'sdd' else repr(sch.name) + ' scheme'} "
                           f"(0-{n - 1}, {IGNORE_INDEX} = ignored){hint}")
    arr = arr.astype(np.uint8)
    if kind == "sdd":
        lut = sch.lut.copy()
        lut[IGNORE_INDEX] = IGNORE_INDEX  # ignored stays ignored (values checked above)
        arr = lut[arr]
    return arr


def _save_image(im: Image.Image, path: Path, fmt: str, **kw: Any) -> None:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    write_bytes_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class Block:
    """One piece of an image predicted in a single :func:`predict_tiled` call.

    Attributes:
        y0, y1, x0, x1: the region fed to ``predict_tiled`` (exactly some tiles of the
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

    The budget covers ``predict_tiled``'s accumulator and weight map (``4 (C + 1)``
    bytes a pixel) and the normalized input (12 bytes a pixel). Among the layouts that
    fit (runs of ``kx`` tile columns, each as many tile rows as then fit), the one that
    predicts the fewest tiles wins: usually full-width strips, whose only recomputed
    tiles are a row or two per strip boundary. When nothing fits (a budget smaller than
    the few tiles one boundary needs), the smallest blocks are taken and the budget is
    exceeded rather than failing.

    Args:
        height, width: image size.
        tile, overlap: as for :func:`segcore.infer.tile_grid`.
        num_out_channels: model outputs ``C``.
        max_block_mb: MiB per block.

    Returns:
        Blocks in row-major order.
    """
    origins = tile_grid(height, width, tile, overlap)
    ys = sorted({y for y, _ in origins})
    xs = sorted({x for _, x in origins})
    per_px = 4 * (num_out_channels + 1) + 12
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


def _logits_to_classes(logits: torch.Tensor, out: np.ndarray, threshold: float) -> None:
    """Write the class map of ``[C, h, w]`` logits into the uint8 view ``out``.

    Same rule as :func:`segcore.infer.predict_image` (argmax; sigmoid > threshold for a
    1-channel head), in row chunks so that temporaries stay small.
    """
    for r in range(0, logits.shape[1], _ARGMAX_ROWS):
        chunk = logits[:, r:r + _ARGMAX_ROWS]
        if logits.shape[0] == 1:
            cls = torch.sigmoid(chunk[0]) > threshold
        else:
            cls = chunk.argmax(dim=0)
        out[r:r + _ARGMAX_ROWS] = cls.to(torch.uint8).numpy()


def predict_classes(model_fn: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray,
                    num_out_channels: int, *, tile: int = 512, overlap: float | int = 0.25,
                    batch_size: int = 4, device: torch.device | str = "cpu",
                    autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                    threshold: float = 0.5, max_block_mb: float = 1024.0,
                    progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Class map of a full-size photo: blockwise :func:`segcore.infer.predict_tiled`.

    Equal to one whole-image ``predict_tiled`` call followed by argmax (see the module
    docstring), with memory bounded by ``max_block_mb`` plus the uint8 image and map.

    Args:
        model_fn: ``[B, 3, tile, tile] -> [B, C, tile, tile]`` logits (eval mode).
        image: RGB uint8 ``(H, W, 3)``; normalized here block by block.
        num_out_channels: ``C`` (1 for a binary sigmoid head).
        tile, overlap, batch_size, device, autocast_dtype, channels_last: passed to
            ``predict_tiled``.
        threshold: for ``C == 1``: class 1 where ``sigmoid(logit) > threshold``.
        max_block_mb: memory per block (see :func:`plan_blocks`).
        progress: ``(tiles_done, tiles_total)`` over the whole image.

    Returns:
        uint8 ``(H, W)`` class indices.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be RGB uint8 (H, W, 3), got {image.dtype} "
                         f"{image.shape}")
    H, W = image.shape[:2]
    blocks = plan_blocks(H, W, tile, overlap, num_out_channels, max_block_mb)
    total = sum(b.tiles for b in blocks)
    classes = np.empty((H, W), dtype=np.uint8)
    done = 0
    for b in blocks:
        sub = normalize(image[b.y0:b.y1, b.x0:b.x1])
        expect = [(y + b.y0, x + b.x0) for y, x in tile_grid(b.y1 - b.y0, b.x1 - b.x0,
                                                                 tile, overlap)]
        if len(expect) != b.tiles:  # the block must reproduce the global grid exactly
            raise RuntimeError(f"internal: block {b} tiles {len(expect)} != {b.tiles}")
        step = (None if progress is None
                else (lambda d, _t, base=done: progress(base + d, total)))
        logits = predict_tiled(model_fn, sub, num_out_channels, tile=tile, overlap=overlap,
                               batch_size=batch_size, device=device,
                               autocast_dtype=autocast_dtype, channels_last=channels_last,
                               progress=step)
        del sub
        keep = logits[:, b.ky0 - b.y0:b.ky1 - b.y0, b.kx0 - b.x0:b.kx1 - b.x0]
        _logits_to_classes(keep, classes[b.ky0:b.ky1, b.kx0:b.kx1], threshold)
        del logits, keep
        done += b.tiles
    return classes


# --------------------------------------------------------------------------- outputs


def overlay(image: np.ndarray, classes: np.ndarray, sch: ClassScheme, alpha: float = 0.5,
            max_side: int = 2048) -> Image.Image:
    """The colour map blended over the photo, downscaled to ``max_side`` (0: full size).

    Classes drawn in black (``unlabeled``, binary ``rest``) are left transparent, so the
    photo shows where nothing was asserted.
    """
    H, W = classes.shape
    scale = 1.0 if not max_side or max(H, W) <= max_side else max_side / max(H, W)
    photo = Image.fromarray(image)
    cls = Image.fromarray(classes)
    if scale < 1.0:
        size = (max(1, round(W * scale)), max(1, round(H * scale)))
        photo = photo.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        cls = cls.resize(size, Image.Resampling.NEAREST)
    p = np.asarray(photo).astype(np.float32)
    c = np.asarray(cls)
    color = sch.colorize(c).astype(np.float32)
    a = np.where(color.any(axis=-1, keepdims=True), np.float32(alpha), np.float32(0.0))
    return Image.fromarray(np.clip(p * (1 - a) + color * a + 0.5, 0, 255).astype(np.uint8))


def image_row(name: str, width: int | None, height: int | None, stats: Mapping[str, Any],
              class_names: Sequence[str], truth: Mapping[str, Any] | None = None,
              correct: int | None = None, valid: int | None = None,
              seconds: float | None = None, images: int = 1) -> dict[str, Any]:
    """One row of ``surface_stats.csv`` from :func:`segcore.flood.surface_stats` results.

    Args:
        name: the image file name, or ``ALL``.
        width, height: image size (``None`` for ``ALL``).
        stats: stats of the predicted map.
        class_names: class order of the ``frac.<class>`` columns.
        truth: stats of the truth mask, if any: adds ``truth_*`` columns and the errors
            ``impervious_fraction_err`` and ``C_typical_err`` (prediction - truth).
        correct, valid: correctly predicted and labelled (non-ignored) truth pixels,
            for ``pixel_accuracy``.
        seconds: wall time of the image.
        images: images in the row.

    Returns:
        A flat dict in column order.
    """
    row: dict[str, Any] = {"image": name, "width": width, "height": height,
                           "pixels": int(stats["pixels_total"])}
    for k in _STAT_KEYS:
        row[k] = stats[k]
    for n in class_names:
        row[f"frac.{n}"] = stats["class_fractions"][n]
    if truth is not None:
        for k in _STAT_KEYS:
            row[f"truth_{k}"] = truth[k]
        for n in class_names:
            row[f"truth_frac.{n}"] = truth["class_fractions"][n]
        row["truth_ignored_pixels"] = int(truth["pixels_ignored"])
        row["impervious_fraction_err"] = stats["impervious_fraction"] - truth["impervious_fraction"]
        row["C_typical_err"] = stats["C_typical"] - truth["C_typical"]
        row["pixel_accuracy"] = (correct / valid) if valid else math.nan
    row["images"] = images
    row["unknown_pixels"] = int(stats["pixels_unknown"])
    row["seconds"] = seconds
    return row


def _frame_csv(rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    cols: dict[str, None] = {}
    for r in rows:
        for k in r:
            cols.setdefault(k, None)
    df = pd.DataFrame(rows, columns=list(cols))
    for c in ("width", "height", "pixels", "images", "unknown_pixels", "truth_ignored_pixels"):
        if c in df:  # integers with gaps (ALL has no width) stay integers in the CSV
            df[c] = df[c].astype("Int64")
    return df.to_csv(index=False)


def plot_summary(rows: Sequence[Mapping[str, Any]], all_row: Mapping[str, Any], path: Path,
                 title_note: str = "") -> None:
    """``summary.png``: surface shares per image and C typical with its low-high range.

    Shares are of *all* pixels, so each bar sums to 1 and the unknown share is visible
    (the surface fractions in the table are of classified pixels).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    items = [*rows, all_row]
    labels = [Path(r["image"]).stem if r is not all_row else "ALL" for r in items]
    n = len(items)

    def nz(v: Any) -> float:
        return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    unknown = np.array([nz(r["unknown_fraction"]) for r in items])
    known = 1.0 - unknown
    parts = [("impervious", "impervious_fraction", "#6b6b6b"),
             ("pervious", "pervious_fraction", "#4c9a2a"),
             ("water", "water_fraction", "#2a6fd1")]
    fig = Figure(figsize=(min(max(8.0, 3 + 0.35 * n), 24), 7.5))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    x = np.arange(n)
    bottom = np.zeros(n)
    edge = ["black" if r is all_row else "none" for r in items]
    for name, key, color in parts:
        share = np.array([nz(r[key]) for r in items]) * known
        a.bar(x, share, bottom=bottom, color=color, label=name, edgecolor=edge)
        bottom += share
    a.bar(x, unknown, bottom=bottom, color="#e6e6e6", hatch="//", label="unknown",
          edgecolor=edge)
    a.set_ylim(0, 1)
    a.set_ylabel("share of all pixels")
    a.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    a.grid(axis="y", alpha=0.3)
    typ = np.array([r["C_typical"] if r["C_typical"] is not None else np.nan for r in items],
                   dtype=float)
    lo = np.array([nz(r["C_low"]) for r in items])
    hi = np.array([nz(r["C_high"]) for r in items])
    err = np.vstack([np.nan_to_num(typ - lo), np.nan_to_num(hi - typ)])
    colors = ["#c0392b" if r is all_row else "#1f77b4" for r in items]
    b.bar(x, np.nan_to_num(typ), yerr=err, color=colors, capsize=3, alpha=0.85,
          error_kw={"elinewidth": 1})
    b.set_ylim(0, 1)
    b.set_ylabel("runoff coefficient C\n(typical, bar: low-high)")
    b.grid(axis="y", alpha=0.3)
    every = max(1, n // 40)  # keep labels legible for large folders
    ticks = [*range(0, n - 1, every), n - 1]
    b.set_xticks(ticks, [labels[i] for i in ticks], rotation=60, ha="right", fontsize=8)
    a.axvline(n - 1.5, color="black", lw=0.8, ls=":")
    b.axvline(n - 1.5, color="black", lw=0.8, ls=":")
    if n <= 30:  # values on the bars while they stay legible
        for xi, v in zip(x, typ):
            if v == v and v > 0.08:  # inside the bar's foot: clear of the range bars
                b.text(xi, 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=7,
                       color="white")

    def pct(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{v:.0%}"

    def num(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{v:.2f}"

    fig.suptitle(
        "Surface shares and Rational-Method runoff coefficient C per image\n"
        f"ALL (area-weighted, {all_row.get('images', n - 1)} images): C typical "
        f"{num(all_row['C_typical'])} (low-high {num(all_row['C_low'])}-"
        f"{num(all_row['C_high'])})\nimpervious {pct(all_row['impervious_fraction'])} of "
        f"classified ground, unknown {pct(all_row['unknown_fraction'])} of pixels"
        + (f"; {title_note}" if title_note else ""),
        fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue())


def _summarize_truth(done: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """ALL-row truth columns: over the images with a truth mask only, so the errors
    compare prediction and truth on the same pixels."""
    with_truth = [d for d in done if d["truth_stats"] is not None]
    if not with_truth:
        return {}
    pred = aggregate([d["stats"] for d in with_truth])
    truth = aggregate([d["truth_stats"] for d in with_truth])
    correct = sum(d["correct"] for d in with_truth)
    valid = sum(d["valid"] for d in with_truth)
    row = image_row("ALL", None, None, pred, names, truth, correct, valid)
    keep = [k for k in row if k.startswith("truth_") or k in (
        "impervious_fraction_err", "C_typical_err", "pixel_accuracy")]
    out = {k: row[k] for k in keep}
    out["truth_images"] = len(with_truth)
    return out


def predict_folder(model_fn: Callable[[torch.Tensor], torch.Tensor], sch: ClassScheme,
                   images: Sequence[Path], out: str | Path, *, num_out_channels: int,
                   table: PropertyTable | None = None,
                   settings: PredictSettings | None = None,
                   device: torch.device | str = "cpu",
                   truth: Mapping[str, Path] | None = None, truth_kind: str = "target",
                   meta: Mapping[str, Any] | None = None,
                   hooks: Hooks | None = None) -> FolderResult:
    """Predict every image and write its maps and the folder's flood statistics.

    Per image (written as soon as it is done): ``<stem>_classes.png`` (mode L indices),
    ``<stem>_color.png``, ``<stem>_overlay.jpg``; after each image ``surface_stats.csv``
    and ``surface_stats.json`` are rewritten (rows so far + ``ALL``), so a crash keeps
    the finished images. ``summary.png`` is drawn at the end. A photo that cannot be
    decoded is reported through ``hooks.log`` and skipped.

    Args:
        model_fn: any callable ``[B, 3, t, t] -> [B, C, t, t]`` logits (eval mode).
        sch: the class scheme of the model's outputs.
        images: image files.
        out: output folder (created).
        num_out_channels: ``C`` (1 for a binary sigmoid head).
        table: surface properties (default: the scheme's defaults).
        settings: tiling, precision, overlay options.
        device: where tiles run (the model must already be there).
        truth: ``{image stem: mask path}`` for the images that have one.
        truth_kind: ``target`` or ``sdd`` (see :func:`read_truth`).
        meta: extra fields for ``surface_stats.json`` (checkpoint, model).
        hooks: progress callbacks.

    Returns:
        A :class:`FolderResult`.

    Raises:
        PredictError: a property table or truth mask that does not fit the scheme
            (checked before any image is predicted).
    """
    from segcore.io import write_json_atomic, write_text_atomic

    settings = settings or PredictSettings()
    hooks = hooks or Hooks()
    table = table or load_properties(None, sch.name)
    if table.scheme != sch.name or tuple(table.names) != sch.names:
        raise PredictError(f"surface properties are for the {table.scheme!r} scheme "
                           f"({table.source}) but the model predicts {sch.name!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    truth = dict(truth or {})
    # Validate every truth mask before hours of inference: a wrong folder or scheme
    # fails now, in one line.
    for img in images:
        if img.stem in truth:
            m = read_truth(truth[img.stem], sch, truth_kind, settings.max_image_pixels)
            size = image_size(img, settings.max_image_pixels)
            if size is not None and size != (m.shape[1], m.shape[0]):
                raise PredictError(f"truth mask {truth[img.stem]} is {m.shape[1]}x"
                                   f"{m.shape[0]} but image {img} is {size[0]}x{size[1]}")
            del m
    autocast = PRECISIONS[settings.precision]
    channels_last = bool(settings.channels_last)
    names = sch.names
    done: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    files: list[Path] = []
    csv_path, json_path = out / "surface_stats.csv", out / "surface_stats.json"
    base = {"tool": "segbench launch/predict.py", **(meta or {}), "scheme": sch.name,
            "class_names": list(names), "settings": settings.to_dict(),
            "truth_kind": truth_kind if truth else None,
            "properties_source": table.source, "properties": table.to_dict(),
            "images_total": len(images),
            "notes": "impervious/pervious/water fractions and C are over classified "
                     "(known) pixels; unknown_fraction is the share of all pixels whose "
                     "class has no surface (unlabeled, fence, person, ...) or is ignored. "
                     "ALL is area-weighted (pixel sums). *_err = prediction - truth."}

    def write_tables(final: bool) -> dict[str, Any] | None:
        rows = [d["row"] for d in done]
        all_row = None
        if done:
            all_row = image_row("ALL", None, None, aggregate([d["stats"] for d in done]),
                                names, seconds=sum(d["row"]["seconds"] for d in done),
                                images=len(done))
            all_row.update(_summarize_truth(done, names))
        table_rows = rows + ([all_row] if all_row else [])
        write_text_atomic(csv_path, _frame_csv(table_rows) if table_rows else "image\n")
        write_json_atomic(json_path, {**base, "complete": final, "images_done": len(done),
                                      "images_skipped": len(skipped), "skipped": skipped,
                                      "images": rows, "all": all_row})
        return all_row

    total = len(images)
    for index, path in enumerate(images):
        t0 = time.perf_counter()
        try:
            image = read_image(path, settings.max_image_pixels)
        except ImageReadError as e:
            skipped.append({"image": path.name, "error": str(e)})
            hooks.say(f"skipped {path}: {e}")
            write_tables(final=False)
            if hooks.image_finished:
                hooks.image_finished(index, total, None)
            continue
        H, W = image.shape[:2]
        if hooks.image_started:
            n_tiles = sum(b.tiles for b in plan_blocks(H, W, settings.tile, settings.overlap,
                                                       num_out_channels,
                                                       settings.max_block_mb))
            hooks.image_started(index, total, path.name, n_tiles)
        classes = predict_classes(model_fn, image, num_out_channels, tile=settings.tile,
                                  overlap=settings.overlap, batch_size=settings.batch_size,
                                  device=device, autocast_dtype=autocast,
                                  channels_last=channels_last, threshold=settings.threshold,
                                  max_block_mb=settings.max_block_mb,
                                  progress=hooks.tiles_done)
        stem = path.stem
        written = [out / f"{stem}_classes.png", out / f"{stem}_color.png",
                   out / f"{stem}_overlay.jpg"]
        _save_image(Image.fromarray(classes), written[0], "PNG")  # uint8 2-D: mode L
        _save_image(Image.fromarray(sch.colorize(classes)), written[1], "PNG",
                    compress_level=3)
        _save_image(overlay(image, classes, sch, settings.overlay_alpha,
                            settings.overlay_max_side), written[2], "JPEG", quality=90)
        files += written
        del image
        stats = surface_stats(classes, names, table, ignore_index=None)
        entry: dict[str, Any] = {"stats": stats, "truth_stats": None, "correct": 0,
                                 "valid": 0}
        if stem in truth:
            mask = read_truth(truth[stem], sch, truth_kind, settings.max_image_pixels)
            valid = mask != IGNORE_INDEX
            entry.update(truth_stats=surface_stats(mask, names, table,
                                                   ignore_index=IGNORE_INDEX),
                         correct=int(np.count_nonzero((classes == mask) & valid)),
                         valid=int(np.count_nonzero(valid)))
            del mask, valid
        elif truth:
            hooks.say(f"no truth mask for {path.name}: its truth columns are empty")
        entry["row"] = image_row(path.name, W, H, stats, names, entry["truth_stats"],
                                 entry["correct"], entry["valid"],
                                 seconds=time.perf_counter() - t0)
        done.append(entry)
        del classes
        write_tables(final=False)
        if hooks.image_finished:
            hooks.image_finished(index, total, entry["row"])
    all_row = write_tables(final=True)
    files += [csv_path, json_path]
    if all_row is not None:
        note = f"{len(skipped)} image(s) skipped (unreadable)" if skipped else ""
        plot_summary([d["row"] for d in done], all_row, out / "summary.png", note)
        files.append(out / "summary.png")
    return FolderResult([d["row"] for d in done], all_row, skipped, out, files)


def predict_checkpoint(checkpoint: str | Path, images: str | Path, out: str | Path, *,
                       settings: PredictSettings | None = None,
                       truth: str | Path | None = None, truth_kind: str = "target",
                       properties: str | Path | None = None,
                       hooks: Hooks | None = None) -> FolderResult:
    """Load a checkpoint and run :func:`predict_folder` over a folder of photos.

    Args:
        checkpoint: ``checkpoint.pt`` of a training run (its saved config gives the
            class scheme and architecture).
        images: folder of photos (or one file).
        out: output folder.
        settings: tiling, device, precision, overlay options.
        truth: folder of truth masks named ``<image stem>.png``.
        truth_kind: ``target`` (indices of the checkpoint's scheme) or ``sdd``.
        properties: TOML overriding the scheme's surface properties.
        hooks: progress callbacks.

    Returns:
        A :class:`FolderResult`.

    Raises:
        PredictError: missing/unreadable/mismatched checkpoint, missing or empty image
            folder, property file or truth masks for another scheme, a tile size the
            architecture cannot take, fp16 on a CPU.
        segcore.flood.PropertyError: an invalid property file.
    """
    from segcore.model.unet import check_input_size

    settings = settings or PredictSettings()
    device = resolve_device(settings.device)
    if settings.precision == "fp16" and device.type != "cuda":
        raise PredictError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    # Cheap checks first: a wrong folder should not wait for a checkpoint load.
    files = list_images(images)
    loaded = load_model(checkpoint, device)
    sch = loaded.scheme
    table = load_properties(properties, sch.name)
    truth_map = find_truth(truth, files) if truth is not None else None
    try:
        check_input_size(loaded.cfg.model, settings.tile, settings.tile)
    except ConfigError as e:
        msg = _one_line(e).replace("--image-size", "--tile")
        for side in ("image height", "image width"):
            msg = msg.replace(side, "tile side")
        raise PredictError(f"--tile {settings.tile} does not fit the checkpoint's model: "
                           f"{msg}") from None
    if settings.channels_last is None:
        settings = PredictSettings(**{**settings.to_dict(),
                                      "channels_last": loaded.cfg.model.channels_last})
    cfg = loaded.cfg
    meta = {"checkpoint": str(Path(checkpoint)), "epoch": loaded.epoch,
            "device": str(device),
            "model": {"arch": cfg.model.arch, "widths": list(cfg.model.widths),
                      "norm": cfg.model.norm, "kernel": cfg.model.kernel,
                      "trained_image_size": cfg.data.image_size}}
    return predict_folder(loaded.model, sch, files, out, num_out_channels=loaded.num_out_channels,
                          table=table, settings=settings, device=device, truth=truth_map,
                          truth_kind=truth_kind, meta=meta, hooks=hooks)
