"""Validate a dataset and cache it at working resolution, once.

The Semantic Drone Dataset ships 6000x4000 photos; decoding one costs more than a training
step on a small crop. :func:`prepare` decodes each source pair once and writes

``OUT/images/<stem>.jpg``
    the photo with its long side at ``size`` (never upscaled), re-encoded as JPEG at
    ``quality`` (decoded at reduced DCT scale with ``Image.draft`` first, then resized with
    a Lanczos filter);
``OUT/masks/<stem>.png``
    the mask resized nearest-neighbour (classes are never interpolated) and remapped to
    the chosen class scheme, stored as an 8-bit index PNG (mode L);
``OUT/manifest.json``
    source, layout, scheme (names and colours), size, quality, the deterministic train/test
    split (same rule as ``split_samples``), per-class pixel counts over the train split
    and the skipped pairs with their reasons. Written last: a folder without it is an
    unfinished run, which :func:`~segcore.data.layouts.discover` refuses.

EXIF orientation is ignored, as by the loaders: the masks were drawn on the stored pixels.
Re-running skips every file that exists under its final name; files are written to a
temporary name in the same folder and moved with ``os.replace``, so a killed run never
leaves a half-written file under a final name.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import warnings
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segcore.data.classes import SCHEMES, ClassScheme, scheme as make_scheme
from segcore.data.layouts import (CACHE_FORMAT, CACHE_VERSION, MANIFEST, SETTINGS,
                                  DatasetError, DatasetIndex, Sample, check_pair,
                                  decode_mask, default_workers, discover, process_pool,
                                  read_manifest, split_samples)
from segcore.io import write_bytes_atomic

JPEG_SUBSAMPLING = "4:2:0"
_TMP_SUFFIX = ".tmp"


@dataclass
class PrepareResult:
    """What one :func:`prepare` call did.

    Attributes:
        out: the cache folder.
        manifest: the manifest written (or found unchanged).
        written: pairs converted by this call.
        reused: pairs whose files already existed (a finished earlier run).
        skipped: one line per skipped file or pair, naming it and the reason.
        seconds: wall time of the call.
    """

    out: Path
    manifest: dict[str, Any]
    written: int = 0
    reused: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Pairs converted per second (0 when nothing was converted)."""
        return self.written / self.seconds if self.written and self.seconds > 0 else 0.0


def target_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the long side at ``size``; never larger than the source."""
    s = min(1.0, size / max(width, height))
    return max(1, round(width * s)), max(1, round(height * s))


def load_resized_image(path: Path, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an image with its long side at ``size``.

    JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) still at least as large as the
    target: a 6000x4000 photo bound for 1024 px decodes at 1500x1000, several times faster
    than a full decode; a Lanczos resize then gives the exact size.

    Returns:
        (RGB image at the working size, (width, height) of the source).
    """
    with Image.open(path) as im:
        src = im.size
        tw, th = target_size(*src, size)
        if im.format == "JPEG" and (tw, th) != src:
            im.draft("RGB", (tw, th))
        rgb = im.convert("RGB")
    if rgb.size != (tw, th):
        # reducing_gap: a cheap box reduction first for large ratios, visually identical.
        rgb = rgb.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return rgb, src


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete (a temp
    file ``.<name>.*.tmp`` in the same folder, fsynced, then renamed)."""
    write_bytes_atomic(path, data)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@dataclass(frozen=True)
class _Task:
    sample: Sample
    image_out: Path
    mask_out: Path
    kind: str
    classes: tuple
    lut: np.ndarray
    num_classes: int
    size: int
    quality: int


@dataclass
class _Outcome:
    stem: str
    status: str  # written | reused | bad
    problems: list[str]
    counts: np.ndarray | None = None
    out_size: tuple[int, int] | None = None


def _header_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def _process(t: _Task) -> _Outcome:
    """Validate and convert one pair (runs in a worker process)."""
    s = t.sample
    img_done, mask_done = t.image_out.is_file(), t.mask_out.is_file()
    if img_done and mask_done:
        with Image.open(t.mask_out) as im:
            target = np.asarray(im)
        counts = np.bincount(target.ravel(), minlength=t.num_classes)[:t.num_classes]
        return _Outcome(s.stem, "reused", [], counts, (target.shape[1], target.shape[0]))

    image = img_size = decoded = None
    errors = []
    # Decode what is missing; a decode that fails is left to check_pair, which decodes the
    # file again to report it in validate()'s words.
    if not img_done:
        try:
            image, img_size = load_resized_image(s.image, t.size)
        except Exception as e:  # any decoder error: reported below
            errors.append(f"corrupt image: {s.image} ({type(e).__name__}: {e})")
    if not mask_done:
        try:
            decoded = decode_mask(s.mask, t.kind, t.classes)
        except Exception as e:  # as above
            errors.append(f"corrupt mask: {s.mask} ({type(e).__name__}: {e})")
    # validate()'s checks, on the arrays decoded above: each full-size mask is decoded
    # once, not once to validate and again to convert.
    problems = check_pair(s, t.kind, t.classes, check_values=not mask_done, decoded=decoded,
                          image_size=img_size)
    if errors and not problems:
        problems = errors  # a file the cheaper check accepts but the conversion cannot read
    if problems:
        return _Outcome(s.stem, "bad", problems)
    if img_size is None:
        img_size = _header_size(s.image)

    tw, th = target_size(*img_size, t.size)
    if image is not None:
        write_atomic(t.image_out, _encode(image, "JPEG", quality=t.quality, subsampling=2))
    if decoded is not None:
        labels = Image.fromarray(decoded[0])
        if labels.size != (tw, th):
            labels = labels.resize((tw, th), Image.Resampling.NEAREST)
        # Remap after the resize: nearest sampling commutes with a lookup, and the
        # lookup then touches the small array only.
        target = t.lut[np.asarray(labels)]
        write_atomic(t.mask_out, _encode(Image.fromarray(target), "PNG"))
    else:
        with Image.open(t.mask_out) as im:
            target = np.asarray(im)
    counts = np.bincount(target.ravel(), minlength=t.num_classes)[:t.num_classes]
    return _Outcome(s.stem, "written", [], counts, (target.shape[1], target.shape[0]))


def _settings(index: DatasetIndex, sch: ClassScheme, size: int, quality: int) -> dict:
    """What the cached files depend on: a re-run with other settings must not reuse them."""
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION,
            "source": str(index.root.resolve()), "layout": index.layout,
            "scheme": sch.name, "names": list(sch.names), "size": size, "quality": quality}


def _check_args(size, classes, quality, workers, test_fraction) -> None:
    from segcore.config import ConfigError

    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"size = {size!r} must be a positive number of pixels (--size)")
    if classes not in SCHEMES:
        raise ConfigError(f"classes = {classes!r} is unknown; choose one of "
                          f"{', '.join(SCHEMES)} (--classes)")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ConfigError(f"quality = {quality!r} must be a JPEG quality from 1 to 100 "
                          "(--quality; 90 is the default)")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers = {workers!r} must be at least 1 (--workers)")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction = {test_fraction!r} must be between 0 and 1 "
                          "(exclusive), e.g. 0.15 (--test-fraction)")


def _check_out_writable(out: Path) -> None:
    """Fail before any work if ``out`` cannot be created or written (checked again, for
    real, when the first file is written)."""
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if p == out and not out.is_dir():
        raise DatasetError(f"--out {out} exists and is not a folder; choose a folder")
    if not p.is_dir():
        raise DatasetError(f"cannot create --out {out}: {p} is not a folder; choose a "
                           "writable folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise DatasetError(f"cannot write to --out {out}: {p} is not writable; choose a "
                           "writable folder")


def _open_out(out: Path, settings: dict) -> None:
    """Create ``out`` (or check it is a cache of the same settings) and record the settings.

    Raises:
        DatasetError: ``out`` cannot be written, is a non-empty non-cache folder, or holds
            a cache prepared with other settings.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create --out {out}: {e.strerror or e}; choose a writable "
                           "folder") from None
    previous = None
    if (out / SETTINGS).is_file():
        try:
            previous = json.loads((out / SETTINGS).read_text())
        except (OSError, ValueError):
            previous = None  # damaged: rewritten below, the files are re-checked anyway
    if previous is None:
        m = read_manifest(out)
        previous = m.get("settings") if m else None
        if previous is None and any(out.iterdir()):
            raise DatasetError(f"--out {out} is not empty and is not a segbench cache; "
                               "choose a new or empty folder")
    if previous is not None and previous != settings:
        flags = {"source": "--src", "scheme": "--classes", "size": "--size",
                 "quality": "--quality"}
        diff = ", ".join(f"{flags.get(k, k)} {previous.get(k)} (now {v})"
                         for k, v in settings.items() if previous.get(k) != v
                         and not (k == "names" and previous.get("scheme") != settings["scheme"]))
        raise DatasetError(f"--out {out} holds a cache prepared with other settings: {diff}; "
                           "choose another --out or delete that folder")
    try:
        for sub in ("images", "masks"):
            (out / sub).mkdir(exist_ok=True)
            # Temporaries of a killed run: never trusted, never reused.
            for p in (out / sub).glob(f".*{_TMP_SUFFIX}"):
                p.unlink(missing_ok=True)
        text = json.dumps(settings, indent=1, sort_keys=True) + "\n"
        if previous != settings or not (out / SETTINGS).is_file():
            write_atomic(out / SETTINGS, text.encode())
    except OSError as e:
        raise DatasetError(f"cannot write to --out {out}: {e.strerror or e}; choose a "
                           "writable folder") from None


def prepare(src: str | Path, out: str | Path, size: int = 1024, classes: str = "six",
            quality: int = 90, strict: bool = False, workers: int | None = None,
            test_fraction: float = 0.15, seed: int = 0,
            progress: bool = False) -> PrepareResult:
    """Validate ``src`` and write the working-resolution cache to ``out``.

    Args:
        src: a dataset folder in any layout :func:`discover` knows (not a cache).
        out: the cache folder (created; re-using one finishes or refreshes it).
        size: long side of the cached images in pixels (smaller sources stay as they are).
        classes: class scheme the cached masks are remapped to (``binary|six|full``).
        quality: JPEG quality of the cached images.
        strict: fail on any problem (after caching the good pairs; no manifest is
            written) instead of skipping bad pairs with a warning.
        workers: processes (default: the cores this process may use).
        test_fraction, seed: the held-out split recorded in the manifest.
        progress: draw a tqdm progress bar on stderr.

    With ``workers > 1`` the pool starts its processes clean (forkserver, or spawn), so a
    script calling this must guard its entry point with ``if __name__ == "__main__":``
    (the usual multiprocessing rule; ``launch/prepare.py`` does).

    Returns:
        A :class:`PrepareResult`.

    Raises:
        ConfigError: an argument out of range.
        DatasetError: missing or unrecognised ``src``, unwritable ``out``, a cache of other
            settings in ``out``, no valid pair, or (``strict``) any problem.
    """
    t0 = time.perf_counter()
    _check_args(size, classes, quality, workers, test_fraction)
    src, out = Path(src), Path(out)
    workers = workers or default_workers()
    if not src.is_dir():
        raise DatasetError(f"--src {src} does not exist or is not a folder; pass the folder "
                           "of the Semantic Drone Dataset")
    _check_out_writable(out)
    index = discover(src, strict=strict)
    if index.layout == "cache":
        raise DatasetError(f"--src {src} is already a prepared cache; pass the original "
                           "dataset folder")
    sch = make_scheme(classes)
    lut = index.target_lut(sch)
    settings = _settings(index, sch, size, quality)
    _open_out(out, settings)

    tasks = [_Task(s, out / "images" / f"{s.stem}.jpg", out / "masks" / f"{s.stem}.png",
                   index.mask_kind, index.classes, lut, sch.num_classes, size, quality)
             for s in index.samples]
    outcomes = _run(tasks, workers, progress)

    bad = [o for o in outcomes if o.status == "bad"]
    problems = [line for o in bad for line in o.problems]
    if problems:
        msg = f"{len(problems)} problem(s) in {src}:\n  " + "\n  ".join(problems)
        if strict:
            raise DatasetError(msg + f"\n(--strict: the good pairs are cached in {out}; fix "
                               "these files and re-run, or drop --strict to skip them)")
        warnings.warn(msg + "\n(these pairs are skipped; pass --strict to fail instead)",
                      stacklevel=2)
    good = {o.stem: o for o in outcomes if o.status != "bad"}
    if len(good) < 2:
        raise DatasetError(f"{src} has {len(good)} valid pair(s); a train/test split needs "
                           "at least 2")

    train, test = split_samples([s for s in index.samples if s.stem in good],
                                test_fraction, seed)
    counts = np.zeros(sch.num_classes, dtype=np.int64)
    for s in train:
        counts += good[s.stem].counts
    total = max(1, int(counts.sum()))
    manifest = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "settings": settings,
        "source": settings["source"], "layout": index.layout,
        "class_table": str(index.class_csv) if index.class_csv else "built-in SDD table",
        "source_classes": [[n, list(c)] for n, c in index.classes],
        "scheme": {"name": sch.name, "names": list(sch.names),
                   "colors": [list(c) for c in sch.colors]},
        "size": size, "quality": quality, "image_format": "JPEG",
        "jpeg_subsampling": JPEG_SUBSAMPLING, "mask_format": "PNG mode L, target indices",
        "split": {"test_fraction": test_fraction, "seed": seed,
                  "train": [s.stem for s in train], "test": [s.stem for s in test]},
        "image_sizes": {o.stem: list(o.out_size) for o in sorted(good.values(),
                                                                 key=lambda o: o.stem)},
        # Counted at cache resolution (nearest-neighbour): close to the full-size shares.
        "class_pixels_train": counts.tolist(),
        "class_frequency_train": [c / total for c in counts.tolist()],
        "skipped": list(index.problems) + problems,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    path = out / MANIFEST
    if not (path.is_file() and path.read_text() == text):
        write_atomic(path, text.encode())
    written = sum(o.status == "written" for o in outcomes)
    return PrepareResult(out, manifest, written, sum(o.status == "reused" for o in outcomes),
                         manifest["skipped"], time.perf_counter() - t0)


def _run(tasks: list[_Task], workers: int, progress: bool) -> list[_Outcome]:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="img", desc="prepare", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    outcomes: list[_Outcome] = []
    try:
        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                outcomes.append(_process(t))
                bar.update()
        else:
            with process_pool(min(workers, len(tasks))) as ex:
                futures = [ex.submit(_process, t) for t in tasks]
                for f in as_completed(futures):
                    outcomes.append(f.result())
                    bar.update()
    finally:
        bar.close()
    return sorted(outcomes, key=lambda o: o.stem)
