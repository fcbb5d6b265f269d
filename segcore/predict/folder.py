"""Prediction over a folder of drone photos: the orchestrator.

``launch/predict.py`` calls :func:`predict_checkpoint`: load a training checkpoint with
the configuration saved inside it (:mod:`segcore.predict.model`), read every photo of a
folder (:mod:`segcore.data.images`), predict its class map block by block on the model's
device (:mod:`segcore.predict.blocks`), and write per image a class map, a colour map,
an overlay (:mod:`segcore.predict.figures`) and the surface statistics of
:mod:`segcore.predict.flood` (impervious fraction, composite runoff coefficient), plus an
area-weighted ``ALL`` row for the folder and a summary figure. :func:`predict_folder`
does the same for any model callable (tests use an oracle).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from segcore.config import ConfigError
from segcore.data.classes import IGNORE_INDEX, ClassScheme
from segcore.data.images import (ImageReadError, find_truth, image_size, list_images,
                                 read_image, read_truth)
from segcore.data.layouts import DatasetError
from segcore.faults import one_line
from segcore.precision import DTYPES
from segcore.predict import PredictError
from segcore.predict.blocks import plan_blocks, predict_classes
from segcore.predict.figures import overlay, plot_summary, save_image
from segcore.predict.flood import PropertyTable, aggregate, load_properties, surface_stats
from segcore.predict.model import DEVICES, load_model, resolve_device

__all__ = ["PRECISIONS", "PredictError", "PredictSettings", "Hooks", "FolderResult",
           "image_row", "predict_folder", "predict_checkpoint"]

PRECISIONS = tuple(DTYPES)  # fp32, bf16 (autocast), fp16 (autocast, CUDA only)
_STAT_KEYS = ("unknown_fraction", "impervious_fraction", "pervious_fraction",
              "water_fraction", "C_low", "C_typical", "C_high")


@contextlib.contextmanager
def _as_predict_error() -> Iterator[None]:
    """The data readers' one-line input errors, as the error prediction reports."""
    try:
        yield
    except DatasetError as e:
        raise PredictError(str(e)) from None


@dataclass(frozen=True)
class PredictSettings:
    """How images are predicted and drawn.

    Attributes:
        tile: tile side in pixels (the model's training crop or a multiple of it).
        overlap: fraction of a tile shared with its neighbour, in [0, 1).
        batch_size: tiles per forward pass.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast, CUDA only).
        threshold: binary schemes only: ``paved-area`` where ``sigmoid(logit) >
            threshold``; ``None``: the checkpoint's rule (``fixed``: 0.5; a per-image
            ``median``/``mean`` rule is refused, see :func:`predict_checkpoint`).
        channels_last: feed NHWC tiles; ``None`` follows the checkpoint's config.
        max_block_mb: device memory for one block's accumulator, weight map, uint8 input
            and class map (MiB; see :func:`segcore.predict.blocks.plan_blocks`).
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
    threshold: float | None = None
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
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
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


def image_row(name: str, width: int | None, height: int | None, stats: Mapping[str, Any],
              class_names: Sequence[str], truth: Mapping[str, Any] | None = None,
              correct: int | None = None, valid: int | None = None,
              seconds: float | None = None, images: int = 1) -> dict[str, Any]:
    """One row of ``surface_stats.csv`` from :func:`segcore.predict.flood.surface_stats` results.

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
        truth_kind: ``target`` or ``sdd`` (see :func:`segcore.data.images.read_truth`).
        meta: extra fields for ``surface_stats.json`` (checkpoint, model).
        hooks: progress callbacks.

    Returns:
        A :class:`FolderResult`.

    Raises:
        PredictError: a property table or truth mask that does not fit the scheme
            (checked before any image is predicted).
    """
    settings = settings or PredictSettings()
    hooks = hooks or Hooks()
    table = table or load_properties(None, sch.name)
    if table.scheme != sch.name or tuple(table.names) != sch.names:
        raise PredictError(f"surface properties are for the {table.scheme!r} scheme "
                           f"({table.source}) but the model predicts {sch.name!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    truth = dict(truth or {})
    # Every truth mask before hours of inference: a wrong folder or scheme fails now.
    _check_truth(images, truth, sch, truth_kind, settings.max_image_pixels)
    tables = _StatsTables(out, sch.names, {
        "tool": "segbench launch/predict.py", **(meta or {}), "scheme": sch.name,
        "class_names": list(sch.names), "settings": settings.to_dict(),
        "truth_kind": truth_kind if truth else None,
        "properties_source": table.source, "properties": table.to_dict(),
        "images_total": len(images),
        "notes": "impervious/pervious/water fractions and C are over classified "
                 "(known) pixels; unknown_fraction is the share of all pixels whose "
                 "class has no surface (unlabeled, fence, person, ...) or is ignored. "
                 "ALL is area-weighted (pixel sums). *_err = prediction - truth."})
    files: list[Path] = []
    total = len(images)
    for index, path in enumerate(images):
        t0 = time.perf_counter()
        try:
            image = read_image(path, settings.max_image_pixels)
        except ImageReadError as e:
            tables.skipped.append({"image": path.name, "error": str(e)})
            hooks.say(f"skipped {path}: {e}")
            tables.write(final=False)
            if hooks.image_finished:
                hooks.image_finished(index, total, None)
            continue
        classes = _predict_image(model_fn, image, path.name, index, total, num_out_channels,
                                 settings, device, hooks)
        files += _write_maps(out, path.stem, image, classes, sch, settings)
        H, W = image.shape[:2]
        del image
        entry = _score(classes, path, truth, sch, table, truth_kind, settings, hooks)
        entry["row"] = image_row(path.name, W, H, entry["stats"], sch.names,
                                 entry["truth_stats"], entry["correct"], entry["valid"],
                                 seconds=time.perf_counter() - t0)
        tables.done.append(entry)
        del classes
        tables.write(final=False)
        if hooks.image_finished:
            hooks.image_finished(index, total, entry["row"])
    all_row = tables.write(final=True)
    files += [tables.csv_path, tables.json_path]
    rows = [d["row"] for d in tables.done]
    if all_row is not None:
        note = f"{len(tables.skipped)} image(s) skipped (unreadable)" if tables.skipped else ""
        plot_summary(rows, all_row, out / "summary.png", note)
        files.append(out / "summary.png")
    return FolderResult(rows, all_row, tables.skipped, out, files)


def _check_truth(images: Sequence[Path], truth: Mapping[str, Path], sch: ClassScheme,
                 truth_kind: str, max_pixels: int | None) -> None:
    """Each truth mask reads in the scheme and has its image's size (one line if not)."""
    for img in images:
        if img.stem in truth:
            m = _truth_mask(truth[img.stem], sch, truth_kind, max_pixels)
            size = image_size(img, max_pixels)
            if size is not None and size != (m.shape[1], m.shape[0]):
                raise PredictError(f"truth mask {truth[img.stem]} is {m.shape[1]}x"
                                   f"{m.shape[0]} but image {img} is {size[0]}x{size[1]}")


def _truth_mask(path: Path, sch: ClassScheme, truth_kind: str,
                max_pixels: int | None) -> np.ndarray:
    with _as_predict_error():
        return read_truth(path, sch, truth_kind, max_pixels)


class _StatsTables:
    """``surface_stats.csv`` / ``.json``: rewritten after every image (rows so far plus
    ``ALL``, area-weighted), so a crash keeps what finished."""

    def __init__(self, out: Path, names: Sequence[str], base: dict[str, Any]) -> None:
        self.names, self.base = names, base
        self.csv_path, self.json_path = out / "surface_stats.csv", out / "surface_stats.json"
        self.done: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []

    def write(self, final: bool) -> dict[str, Any] | None:
        from segcore.io import write_json_atomic, write_text_atomic

        rows = [d["row"] for d in self.done]
        all_row = None
        if self.done:
            all_row = image_row("ALL", None, None, aggregate([d["stats"] for d in self.done]),
                                self.names, seconds=sum(r["seconds"] for r in rows),
                                images=len(self.done))
            all_row.update(_summarize_truth(self.done, self.names))
        table_rows = rows + ([all_row] if all_row else [])
        write_text_atomic(self.csv_path, _frame_csv(table_rows) if table_rows else "image\n")
        write_json_atomic(self.json_path, {
            **self.base, "complete": final, "images_done": len(self.done),
            "images_skipped": len(self.skipped), "skipped": self.skipped, "images": rows,
            "all": all_row})
        return all_row


def _predict_image(model_fn: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray,
                   name: str, index: int, total: int, num_out_channels: int,
                   settings: PredictSettings, device: torch.device | str,
                   hooks: Hooks) -> np.ndarray:
    """The class map of one photo (tiled, in blocks within the memory budget)."""
    H, W = image.shape[:2]
    if hooks.image_started:
        n_tiles = sum(b.tiles for b in plan_blocks(H, W, settings.tile, settings.overlap,
                                                   num_out_channels, settings.max_block_mb))
        hooks.image_started(index, total, name, n_tiles)
    return predict_classes(
        model_fn, image, num_out_channels, tile=settings.tile, overlap=settings.overlap,
        batch_size=settings.batch_size, device=device,
        autocast_dtype=None if settings.precision == "fp32" else DTYPES[settings.precision],
        channels_last=bool(settings.channels_last),
        threshold=0.5 if settings.threshold is None else settings.threshold,
        max_block_mb=settings.max_block_mb, progress=hooks.tiles_done)


def _write_maps(out: Path, stem: str, image: np.ndarray, classes: np.ndarray,
                sch: ClassScheme, settings: PredictSettings) -> list[Path]:
    """``<stem>_classes.png`` (indices), ``_color.png`` and ``_overlay.jpg``."""
    written = [out / f"{stem}_classes.png", out / f"{stem}_color.png",
               out / f"{stem}_overlay.jpg"]
    save_image(Image.fromarray(classes), written[0], "PNG")  # uint8 2-D: mode L
    save_image(Image.fromarray(sch.colorize(classes)), written[1], "PNG", compress_level=3)
    save_image(overlay(image, classes, sch, settings.overlay_alpha,
                       settings.overlay_max_side), written[2], "JPEG", quality=90)
    return written


def _score(classes: np.ndarray, path: Path, truth: Mapping[str, Path], sch: ClassScheme,
           table: PropertyTable, truth_kind: str, settings: PredictSettings,
           hooks: Hooks) -> dict[str, Any]:
    """Surface statistics of one class map, and against its truth mask if it has one."""
    entry: dict[str, Any] = {"stats": surface_stats(classes, sch.names, table,
                                                    ignore_index=None),
                             "truth_stats": None, "correct": 0, "valid": 0}
    if path.stem in truth:
        mask = _truth_mask(truth[path.stem], sch, truth_kind, settings.max_image_pixels)
        valid = mask != IGNORE_INDEX
        entry.update(truth_stats=surface_stats(mask, sch.names, table,
                                               ignore_index=IGNORE_INDEX),
                     correct=int(np.count_nonzero((classes == mask) & valid)),
                     valid=int(np.count_nonzero(valid)))
    elif truth:
        hooks.say(f"no truth mask for {path.name}: its truth columns are empty")
    return entry


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
        segcore.predict.flood.PropertyError: an invalid property file.
    """
    from segcore.model.unet import check_input_size

    settings = settings or PredictSettings()
    device = resolve_device(settings.device)
    if settings.precision == "fp16" and device.type != "cuda":
        raise PredictError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    # Cheap checks first: a wrong folder should not wait for a checkpoint load.
    with _as_predict_error():
        files = list_images(images)
    loaded = load_model(checkpoint, device)
    sch = loaded.scheme
    table = load_properties(properties, sch.name)
    with _as_predict_error():
        truth_map = find_truth(truth, files) if truth is not None else None
    try:
        check_input_size(loaded.cfg.model, settings.tile, settings.tile)
    except ConfigError as e:
        msg = one_line(e).replace("--image-size", "--tile")
        for side in ("image height", "image width"):
            msg = msg.replace(side, "tile side")
        raise PredictError(f"--tile {settings.tile} does not fit the checkpoint's model: "
                           f"{msg}") from None
    if settings.channels_last is None:
        settings = PredictSettings(**{**settings.to_dict(),
                                      "channels_last": loaded.cfg.model.channels_last})
    rule = loaded.cfg.data.pred_threshold
    if settings.threshold is None:
        if rule != "fixed":
            # A per-image median/mean split gives every photo the same paved share by
            # construction (the study's evaluation): as a flood map it would be wrong.
            raise PredictError(f"the checkpoint validates with --pred-threshold {rule} (each "
                               "image split into equal shares), which would give every photo "
                               "the same paved share; pass --threshold P (e.g. 0.5) to map "
                               "with a fixed probability cut")
        settings = PredictSettings(**{**settings.to_dict(), "threshold": 0.5})
    cfg = loaded.cfg
    meta = {"checkpoint": str(Path(checkpoint)), "epoch": loaded.epoch,
            "device": str(device),
            "model": {"arch": cfg.model.arch, "widths": list(cfg.model.widths),
                      "norm": cfg.model.norm, "kernel": cfg.model.kernel,
                      "trained_image_size": cfg.data.image_size}}
    return predict_folder(loaded.model, sch, files, out,
                          num_out_channels=loaded.num_out_channels, table=table,
                          settings=settings, device=device, truth=truth_map,
                          truth_kind=truth_kind, meta=meta, hooks=hooks)
