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
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from segcore.config import ConfigError
from segcore.data.classes import IGNORE_INDEX, ClassScheme
from segcore.data.images import find_truth, image_size, list_images, read_truth
from segcore.data.layouts import DatasetError
from segcore.faults import one_line
from segcore.precision import DTYPES
from segcore.predict import PredictError
from segcore.predict.blocks import plan_blocks, predict_class_map
from segcore.predict.figures import overlay, plot_summary, save_image
from segcore.predict.flood import PropertyTable, aggregate, load_properties, surface_stats
from segcore.predict.model import DEVICES, load_model, resolve_device
from segcore.predict.pipeline import (DECODES, FIGURES, PNG_LEVEL, Photo, PhotoReader,
                                      Prefetcher, StageTimes, Writers, class_counts,
                                      stats_from_counts)

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
        decode: ``cpu`` (PIL) or ``gpu`` (nvJPEG on the CUDA device, for JPEGs).
        prefetch: photos decoded ahead of the model by the reader thread, besides the
            one it is decoding (0: decode in the model's thread, no thread).
        writers: threads encoding and writing outputs, and photos written at a time
            (0: write in the model's thread). See :mod:`segcore.predict.pipeline`.
        figures: files besides the class map: ``all`` (colour map and overlay),
            ``color``, ``overlay`` or ``none``.
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
    decode: str = "cpu"
    prefetch: int = 1
    writers: int = 2
    figures: str = "all"

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
        positive_int("prefetch", allow_zero=True)
        positive_int("writers", allow_zero=True)
        for name, choices in (("decode", DECODES), ("figures", FIGURES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"predict.{name} = {getattr(self, name)!r} is not valid; "
                                  f"choose one of: {', '.join(choices)}")
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
        timing: busy seconds per stage, wall time, images and pixels (``timing.json``).
    """

    rows: list[dict[str, Any]]
    all_row: dict[str, Any] | None
    skipped: list[dict[str, str]]
    out: Path
    files: list[Path] = field(default_factory=list)
    timing: StageTimes | None = None

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
        seconds: wall time of the image (from its decode to its files written).
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
                   hooks: Hooks | None = None,
                   decoder: Callable[..., Any] | None = None) -> FolderResult:
    """Predict every image and write its maps and the folder's flood statistics.

    Per image (written as soon as it is done): ``<stem>_classes.png`` (mode L indices),
    ``<stem>_color.png``, ``<stem>_overlay.jpg``; after each image ``surface_stats.csv``
    and ``surface_stats.json`` are rewritten (rows so far + ``ALL``), so a crash keeps
    the finished images. ``summary.png`` is drawn at the end. A photo that cannot be
    decoded is reported through ``hooks.log`` and skipped. Decoding, inference and
    writing overlap (:mod:`segcore.predict.pipeline`; ``settings.prefetch`` and
    ``settings.writers``); rows, files and hooks still come in input order.

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
        decoder: with ``settings.decode == "gpu"``, a batch JPEG decoder replacing
            torchvision's (tests; see :func:`segcore.data.nvjpeg.decode_jpegs`).

    Returns:
        A :class:`FolderResult`.

    Raises:
        PredictError: a property table or truth mask that does not fit the scheme
            (checked before any image is predicted).
        ConfigError: ``--decode gpu`` without a CUDA device or torchvision.
    """
    settings = settings or PredictSettings()
    hooks = hooks or Hooks()
    if settings.decode == "gpu":
        from segcore.data.nvjpeg import check_gpu_decode

        check_gpu_decode(device, decoder)
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
    times = StageTimes(str(device))
    run = _FolderRun(model_fn, sch, out, num_out_channels, table, settings,
                     torch.device(device), truth, truth_kind, tables, hooks, times,
                     len(images))
    reader = Prefetcher(images, PhotoReader(run.device, settings.decode,
                                            settings.max_image_pixels, times, decoder),
                        settings.prefetch)
    writers = Writers(settings.writers, times)
    try:
        run.run(reader, writers)
    finally:
        reader.close()
        writers.close()
    all_row = tables.write(final=True, wall=times.elapsed())
    times.finish()
    files = run.files + [tables.csv_path, tables.json_path]
    rows = [d["row"] for d in tables.done]
    if all_row is not None:
        note = f"{len(tables.skipped)} image(s) skipped (unreadable)" if tables.skipped else ""
        plot_summary(rows, all_row, out / "summary.png", note)
        files.append(out / "summary.png")
    return FolderResult(rows, all_row, tables.skipped, out, files, times)


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

    def write(self, final: bool, wall: float) -> dict[str, Any] | None:
        """Rewrite both files; ``wall``: the folder's seconds so far (the ALL row's
        ``seconds``: photos overlap in the pipeline, so their own seconds, each from its
        decode to its files written, do not add up to the run's time)."""
        from segcore.io import write_json_atomic, write_text_atomic

        rows = [d["row"] for d in self.done]
        all_row = None
        if self.done:
            all_row = image_row("ALL", None, None, aggregate([d["stats"] for d in self.done]),
                                self.names, seconds=wall,
                                images=len(self.done))
            all_row.update(_summarize_truth(self.done, self.names))
        table_rows = rows + ([all_row] if all_row else [])
        write_text_atomic(self.csv_path, _frame_csv(table_rows) if table_rows else "image\n")
        write_json_atomic(self.json_path, {
            **self.base, "complete": final, "images_done": len(self.done),
            "images_skipped": len(self.skipped), "skipped": self.skipped, "images": rows,
            "all": all_row})
        return all_row


@dataclass
class _Pending:
    """A predicted photo whose files are being written."""

    photo: Photo
    height: int
    width: int
    stats: dict[str, Any]
    files: list[tuple[Path, Future]]
    truth: Future | None


def _save_classes(path: Path, classes: np.ndarray) -> None:
    save_image(Image.fromarray(classes), path, "PNG", compress_level=PNG_LEVEL)  # mode L


def _save_color(path: Path, classes: np.ndarray, sch: ClassScheme) -> None:
    save_image(Image.fromarray(sch.colorize(classes)), path, "PNG", compress_level=PNG_LEVEL)


def _save_overlay(path: Path, photo: np.ndarray, classes: np.ndarray, sch: ClassScheme,
                  settings: PredictSettings) -> None:
    save_image(overlay(photo, classes, sch, settings.overlay_alpha,
                       settings.overlay_max_side), path, "JPEG", quality=90)


def _writing(path: Path, save: Callable[..., None], *args: Any) -> None:
    """``save(path, *args)``; a failure names the file it was writing."""
    try:
        save(path, *args)
    except OSError as e:
        raise OSError(f"cannot write {path} ({one_line(e, 200)})") from e


class _FolderRun:
    """The per-photo work of :func:`predict_folder`, stage by stage (see
    :mod:`segcore.predict.pipeline`): predict in the calling thread, write in the pool,
    finish (table row, hooks) in input order."""

    def __init__(self, model_fn: Callable[[torch.Tensor], torch.Tensor], sch: ClassScheme,
                 out: Path, num_out_channels: int, table: PropertyTable,
                 settings: PredictSettings, device: torch.device, truth: Mapping[str, Path],
                 truth_kind: str, tables: _StatsTables, hooks: Hooks, times: StageTimes,
                 total: int) -> None:
        self.model_fn, self.sch, self.out, self.table = model_fn, sch, out, table
        self.num_out_channels, self.settings, self.device = num_out_channels, settings, device
        self.truth, self.truth_kind, self.tables = truth, truth_kind, tables
        self.hooks, self.times, self.total = hooks, times, total
        self.files: list[Path] = []

    def run(self, reader: Prefetcher, writers: Writers) -> None:
        """Every photo of ``reader``; on an error, the photos already predicted are
        finished (files and table rows) before it is raised."""
        pending: deque[_Pending] = deque()
        try:
            for photo in reader:
                if photo.error is not None:
                    self._drain(pending, keep=0)
                    self._skip(photo)
                    continue
                pending.append(self._predict(photo, writers))
                del photo
                self._drain(pending, keep=max(1, writers.workers))
            self._drain(pending, keep=0)
        except Exception:
            with contextlib.suppress(Exception):
                self._drain(pending, keep=0)
            raise

    def _drain(self, pending: deque[_Pending], keep: int) -> None:
        """Finish photos in order: those done, and (waiting) all but the last ``keep``."""
        while pending and (len(pending) > keep
                           or (all(f.done() for _, f in pending[0].files)
                               and (pending[0].truth is None or pending[0].truth.done()))):
            self._finish(pending[0])
            pending.popleft()

    def _skip(self, photo: Photo) -> None:
        self.tables.skipped.append({"image": photo.path.name, "error": str(photo.error)})
        self.hooks.say(f"skipped {photo.path}: {photo.error}")
        self.times.skipped += 1
        self.tables.write(final=False, wall=self.times.elapsed())
        if self.hooks.image_finished:
            self.hooks.image_finished(photo.index, self.total, None)

    def _predict(self, photo: Photo, writers: Writers) -> _Pending:
        """Class map and counts on the device; the files handed to the writers."""
        s, hooks = self.settings, self.hooks
        H, W = photo.height, photo.width
        if hooks.image_started:
            n_tiles = sum(b.tiles for b in plan_blocks(H, W, s.tile, s.overlap,
                                                       self.num_out_channels,
                                                       s.max_block_mb))
            hooks.image_started(photo.index, self.total, photo.path.name, n_tiles)
        with self.times.stage("infer"):
            on_device = predict_class_map(
                self.model_fn, photo.pixels, self.num_out_channels, tile=s.tile,
                overlap=s.overlap, batch_size=s.batch_size, device=self.device,
                autocast_dtype=None if s.precision == "fp32" else DTYPES[s.precision],
                channels_last=bool(s.channels_last),
                threshold=0.5 if s.threshold is None else s.threshold,
                max_block_mb=s.max_block_mb, progress=hooks.tiles_done)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # honest stage times
        with self.times.stage("stats"):
            counts = class_counts(on_device, len(self.sch.names)).cpu().numpy()
            classes = on_device.cpu().numpy()  # the only pixels that come back
            stats = stats_from_counts(counts, self.sch, self.table)
            rgb = photo.host_pixels() if s.figures in ("all", "overlay") else None
        del on_device
        photo.pixels = photo.host = None  # the pending photo keeps no pixels
        stem = photo.path.stem
        jobs: list[tuple[Path, Callable[..., None], tuple]] = [
            (self.out / f"{stem}_classes.png", _save_classes, (classes,))]
        if s.figures in ("all", "color"):
            jobs.append((self.out / f"{stem}_color.png", _save_color, (classes, self.sch)))
        if rgb is not None:
            jobs.append((self.out / f"{stem}_overlay.jpg", _save_overlay,
                         (rgb, classes, self.sch, s)))
        files = [(path, writers.submit(_writing, path, save, *args))
                 for path, save, args in jobs]
        truth = (writers.submit(self._score_truth, classes, self.truth[stem])
                 if stem in self.truth else None)
        return _Pending(photo, H, W, stats, files, truth)

    def _score_truth(self, classes: np.ndarray, mask_path: Path) -> dict[str, Any]:
        """Truth stats of a photo's mask and the pixels the prediction got right."""
        mask = _truth_mask(mask_path, self.sch, self.truth_kind,
                           self.settings.max_image_pixels)
        valid = mask != IGNORE_INDEX
        return {"truth_stats": surface_stats(mask, self.sch.names, self.table,
                                             ignore_index=IGNORE_INDEX),
                "correct": int(np.count_nonzero((classes == mask) & valid)),
                "valid": int(np.count_nonzero(valid))}

    def _finish(self, item: _Pending) -> None:
        """Wait for a photo's files, then its table row and hooks (input order)."""
        written = []
        for path, future in item.files:
            future.result()  # raises the writer's error in this thread
            written.append(path)
        name = item.photo.path.name
        entry: dict[str, Any] = {"stats": item.stats, "truth_stats": None, "correct": 0,
                                 "valid": 0}
        if item.truth is not None:
            entry.update(item.truth.result())
        elif self.truth:
            self.hooks.say(f"no truth mask for {name}: its truth columns are empty")
        entry["row"] = image_row(name, item.width, item.height, entry["stats"],
                                 self.sch.names, entry["truth_stats"], entry["correct"],
                                 entry["valid"],
                                 seconds=time.perf_counter() - item.photo.started)
        self.files += written
        self.tables.done.append(entry)
        self.times.images += 1
        self.times.pixels += item.height * item.width
        with self.times.stage("write"):
            self.tables.write(final=False, wall=self.times.elapsed())
        if self.hooks.image_finished:
            self.hooks.image_finished(item.photo.index, self.total, entry["row"])


def prediction_device(settings: PredictSettings) -> torch.device:
    """The device ``settings`` ask for, refused in one line where its precision cannot
    run (fp16 on a CPU)."""
    device = resolve_device(settings.device)
    if settings.precision == "fp16" and device.type != "cuda":
        raise PredictError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return device


def settled_for(loaded: Any, settings: PredictSettings) -> PredictSettings:
    """``settings`` checked against a loaded checkpoint and completed from it: the tile
    must fit the architecture, ``channels_last`` follows the checkpoint when unset, and
    the binary threshold is the checkpoint's fixed 0.5 (a per-image median/mean rule is
    refused without ``--threshold``). Shared by the photo and GeoTIFF runs.

    Raises:
        PredictError: a tile the model cannot take, or a median/mean rule without a
            threshold.
    """
    from segcore.model.unet import check_input_size

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
    return settings


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
        ConfigError: ``--decode gpu`` without a CUDA device or torchvision with nvJPEG
            (checked before the checkpoint is loaded).
        segcore.predict.flood.PropertyError: an invalid property file.
    """
    settings = settings or PredictSettings()
    device = prediction_device(settings)
    if settings.decode == "gpu":
        from segcore.data.nvjpeg import check_gpu_decode

        check_gpu_decode(device)
    # Cheap checks first: a wrong folder should not wait for a checkpoint load.
    with _as_predict_error():
        files = list_images(images)
    loaded = load_model(checkpoint, device)
    sch = loaded.scheme
    table = load_properties(properties, sch.name)
    with _as_predict_error():
        truth_map = find_truth(truth, files) if truth is not None else None
    settings = settled_for(loaded, settings)
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
