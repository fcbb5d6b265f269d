"""Prediction at device speed: decode, inference and writing overlap.

A folder run has four stages per photo: **decode** (JPEG -> uint8 pixels), **infer**
(tiles through the model, blended, argmax: :func:`segcore.predict.blocks.predict_class_map`),
**stats** (per-class pixel counts and the copies back to the host) and **write** (the
class-map PNG, colour map, overlay, truth comparison). Run one after the other, a GPU
waits for the host most of the time: on an H200 a 24 Mpx photo took 7.8 s while its
forward passes take 0.03 s. Here they overlap:

* :class:`Prefetcher`: a reader thread decodes the next photos while the model runs on
  the current one, through a bounded queue (``prefetch`` photos waiting, one more being
  decoded). With ``--decode gpu`` the reader hands the JPEG bytes to nvJPEG
  (:mod:`segcore.data.nvjpeg`) and the pixels land on the device; with ``--decode cpu``
  PIL decodes and, on a CUDA device, the reader uploads the pixels, so the main thread
  only launches kernels.
* The main thread predicts, counts classes with ``torch.bincount`` on the device, and
  copies back only the uint8 class map (1 byte a pixel) and the counts
  (:func:`class_counts`, :func:`stats_from_counts`).
* :class:`Writers`: a thread pool encodes and writes the files (PIL and zlib release the
  GIL while they encode), at most ``writers`` photos at a time, in order of completion
  of the model but finished (table rows, hooks) in input order.

Memory (H x W pixels a photo): host ``(prefetch + 1) * 3 * H * W`` bytes decoded ahead
(device bytes instead with ``--decode gpu``, plus the same on the device with
``--decode cpu`` on CUDA), and about ``7 * H * W`` bytes (photo, class map, colour map)
for each of up to ``writers`` photos being written. For 24 Mpx photos with prefetch 1
and 4 writers that is about 0.15 GB + 0.7 GB.

``prefetch = 0`` and ``writers = 0`` run every stage in the calling thread: the
sequential path, whose outputs the pipelined run reproduces byte for byte (tested).
Errors keep their single-thread behaviour: an unreadable photo is skipped and listed, any
other error of a reader or writer thread is raised again in the calling thread, after the
photos already predicted have been written.

:class:`StageTimes` records each stage's busy seconds and the wall time; the launcher
writes them to ``timing.json`` and prints one Mpx/s line.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from segcore.data.classes import ClassScheme
from segcore.data.images import ImageReadError, image_size, read_image
from segcore.predict.flood import PropertyTable

__all__ = ["DECODES", "FIGURES", "PNG_LEVEL", "STAGES", "StageTimes", "Photo",
           "PhotoReader", "Prefetcher", "Writers", "class_counts", "stats_from_counts"]

DECODES = ("cpu", "gpu")
# Files written per photo besides the class map: all, the colour map only, the overlay
# only, or none.
FIGURES = ("all", "color", "overlay", "none")
# zlib level of the class-map and colour-map PNGs. A 4000 x 6000 six-class map on the
# 2-core reference VM (docs/PREDICTION.md): level 1 0.28 s / 3.9 MB, level 3 0.41 s /
# 3.4 MB, level 6 (PIL's default) 0.99 s / 2.9 MB; the colour map 0.60 / 0.76 / 1.48 s.
# Level 1 is 3.5x faster than 6 for 35 % more bytes: the maps are written once per photo
# and read rarely, so speed wins.
PNG_LEVEL = 1
JPEG_SUFFIXES = (".jpg", ".jpeg")
STAGES = ("decode", "infer", "stats", "write")


class StageTimes:
    """Busy seconds per stage (summed over threads, so stages that overlap can add up to
    more than the wall time), images and pixels predicted, and the wall time."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._lock = threading.Lock()
        self.busy = dict.fromkeys(STAGES, 0.0)
        self.images = 0
        self.skipped = 0
        self.pixels = 0
        self.cpu_fallbacks = 0
        self.start = time.perf_counter()
        self.wall = 0.0

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.busy[stage] += seconds

    def count_fallback(self) -> None:
        """One JPEG that ``--decode gpu`` left to PIL."""
        with self._lock:
            self.cpu_fallbacks += 1

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Count the time spent in the ``with`` block as ``name``'s busy time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def finish(self) -> None:
        self.wall = self.elapsed()

    @property
    def megapixels(self) -> float:
        return self.pixels / 1e6

    @property
    def mpx_per_s(self) -> float | None:
        return self.megapixels / self.wall if self.wall > 0 and self.images else None

    def to_dict(self, **context: Any) -> dict[str, Any]:
        """The content of ``timing.json`` (``context``: settings to record beside it)."""
        return {
            "images": self.images, "images_skipped": self.skipped,
            "megapixels": round(self.megapixels, 6),
            "wall_s": round(self.wall, 4),
            "mpx_per_s": None if self.mpx_per_s is None else float(f"{self.mpx_per_s:.4g}"),
            "busy_s": {k: round(v, 4) for k, v in self.busy.items()},
            "gpu_decode_cpu_fallbacks": self.cpu_fallbacks, "device": self.device,
            **context,
            "notes": "busy_s: seconds each stage's threads were busy, summed (stages "
                     "overlap, so they may add up to more than wall_s); decode: reading "
                     "and decoding photos (skipped ones too); infer: tiles through the "
                     "model, blend and argmax; stats: class counts on the device, copies "
                     "back, surface statistics; write: encoding and writing files, truth "
                     "comparison, the stats tables. wall_s: from the first read to the last "
                     "photo's files written (model load and summary.png excluded). "
                     "mpx_per_s = megapixels / wall_s over the `images` predicted.",
        }

    def line(self) -> str:
        """``speed: 12.3 Mpx/s end to end over 6 image(s) (decode 1.2 s, ... busy; wall
        22.5 s)``."""
        rate = "n/a" if self.mpx_per_s is None else f"{self.mpx_per_s:.3g}"
        busy = ", ".join(f"{k} {v:.1f} s" for k, v in self.busy.items())
        return (f"speed: {rate} Mpx/s end to end over {self.images} image(s) ({busy} busy; "
                f"wall {self.wall:.1f} s)")


@dataclass
class Photo:
    """One decoded photo (or why it could not be).

    Attributes:
        index: position in the folder.
        path: the file.
        pixels: uint8 ``[3, H, W]`` on the model's device (a view of ``host`` on a CPU).
        host: uint8 ``(H, W, 3)`` on the host when PIL decoded it, else ``None``.
        error: the reason it is skipped, if it is.
        started: ``time.perf_counter()`` when its decode began.
    """

    index: int
    path: Path
    pixels: torch.Tensor | None
    host: np.ndarray | None
    error: ImageReadError | None
    started: float

    @property
    def height(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[2])

    def host_pixels(self) -> np.ndarray:
        """uint8 ``(H, W, 3)`` on the host (copied back once when decoded on the device)."""
        if self.host is None:
            self.host = self.pixels.permute(1, 2, 0).contiguous().cpu().numpy()
        return self.host


class PhotoReader:
    """Decode one photo for the model: ``reader(index, path) -> Photo``.

    Args:
        device: the model's device (pixels land there).
        decode: ``cpu`` (PIL, as training reads) or ``gpu`` (nvJPEG for .jpg/.jpeg;
            other formats, and a JPEG nvJPEG refuses, are decoded by PIL).
        max_pixels: larger photos are skipped (``--max-image-pixels``).
        times: where decode seconds go.
        decoder: injected batch decoder for ``gpu`` (tests; see
            :func:`segcore.data.nvjpeg.decode_jpegs`).
    """

    def __init__(self, device: torch.device, decode: str, max_pixels: int,
                 times: StageTimes, decoder: Callable[..., Any] | None = None) -> None:
        self.device, self.decode, self.max_pixels = device, decode, max_pixels
        self.times, self.decoder = times, decoder

    def __call__(self, index: int, path: Path) -> Photo:
        t0 = time.perf_counter()
        try:
            pixels, host = self._read(path)
            return Photo(index, path, pixels, host, None, t0)
        except ImageReadError as e:
            return Photo(index, path, None, None, e, t0)
        finally:
            self.times.add("decode", time.perf_counter() - t0)

    def _read(self, path: Path) -> tuple[torch.Tensor, np.ndarray | None]:
        if self.decode == "gpu" and path.suffix.lower() in JPEG_SUFFIXES:
            pixels = self._read_on_device(path)
            if pixels is not None:
                return pixels, None
            self.times.count_fallback()
        host = read_image(path, self.max_pixels)  # ImageReadError: skipped
        # Uploaded here, off the model's thread, as stored (HWC: one contiguous copy);
        # the CHW view costs nothing on either side.
        return torch.from_numpy(host).to(self.device).permute(2, 0, 1), host

    def _read_on_device(self, path: Path) -> torch.Tensor | None:
        """nvJPEG decode, or ``None`` when PIL should decide (a header PIL cannot read,
        a JPEG nvJPEG refuses: PIL then decodes it or gives the CPU path's error)."""
        from segcore.data.nvjpeg import GpuDecodeError, decode_jpegs

        size = image_size(path, self.max_pixels)
        if size is None or size[0] * size[1] > self.max_pixels:
            return None  # read_image raises the CPU path's one-line reason
        try:
            return decode_jpegs([path.read_bytes()], [path.name], self.device,
                                self.decoder)[0]
        except GpuDecodeError:
            return None


class _Failed:
    """An unexpected exception of the reader thread, carried to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher:
    """``read(index, path)`` for every path, in order, up to ``prefetch`` results ahead.

    With ``prefetch = 0`` the reads run in the consuming thread when asked for. Otherwise
    a daemon thread reads into a queue of ``prefetch`` slots (so at most ``prefetch + 1``
    photos are decoded ahead of the consumer); an exception it raises is raised again by
    the iterator. :meth:`close` stops the thread and drops what it read ahead.
    """

    def __init__(self, paths: Sequence[Path], read: Callable[[int, Path], Photo],
                 prefetch: int) -> None:
        self.paths, self.read, self.prefetch = list(paths), read, prefetch
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._thread: threading.Thread | None = None
        if prefetch > 0 and self.paths:
            self._thread = threading.Thread(target=self._run, name="predict-reader",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        for i, path in enumerate(self.paths):
            if self._stop.is_set():
                return
            try:
                item: Photo | _Failed = self.read(i, path)
            except BaseException as e:  # carried to the consumer, raised there
                item = _Failed(e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failed):
                return

    def __iter__(self) -> Iterator[Photo]:
        for i, path in enumerate(self.paths):
            if self._thread is None:
                yield self.read(i, path)
                continue
            item = self._queue.get()
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    self._queue.get(timeout=0.05)  # unblock a put, drop the photo
            self._thread = None


class Writers:
    """A bounded pool of writer threads; ``workers = 0`` writes in the calling thread.

    Every task's seconds count as ``write`` busy time. Tasks return their result through
    a :class:`~concurrent.futures.Future` in both modes, so the caller handles them the
    same way; an exception is raised by ``future.result()``.
    """

    def __init__(self, workers: int, times: StageTimes) -> None:
        self.workers, self.times = workers, times
        self._pool = (ThreadPoolExecutor(workers, thread_name_prefix="predict-writer")
                      if workers > 0 else None)

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.times.stage("write"):
            return fn(*args)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._pool is not None:
            return self._pool.submit(self._timed, fn, *args)
        f: Future = Future()
        try:
            f.set_result(self._timed(fn, *args))
        except Exception as e:
            f.set_exception(e)
        return f

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None


def class_counts(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pixels per class of a uint8 class map, counted where the map is (int64,
    length ``num_classes``)."""
    return torch.bincount(classes.reshape(-1), minlength=num_classes)[:num_classes]


def stats_from_counts(counts: np.ndarray, sch: ClassScheme,
                      table: PropertyTable) -> dict[str, Any]:
    """:func:`segcore.predict.flood.surface_stats` of a predicted map from its class
    counts (made on the device instead of a host ``np.bincount``; a predicted map has no
    ignored pixels): :func:`segcore.predict.flood.stats_from_counts`."""
    from segcore.predict.flood import stats_from_counts as from_counts

    if np.shape(counts) != (len(sch.names),):
        raise ValueError(f"{np.shape(counts)} counts for the {len(sch.names)} classes of "
                         f"{sch.name!r}")
    return from_counts(counts, sch.names, table)
