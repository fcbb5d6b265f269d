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
    split (same rule as ``split_samples``), per-class pixel counts over the train split,
    the offline augmentation (if any) and every skipped pair with its reason. Written last: a folder without it is an
    unfinished run, which :func:`~segcore.data.layouts.discover` refuses.

With ``offline_augment = n`` (2 to 4) every *training* photo also gets the next of the
reference study's four variants (:data:`VARIANTS`): ``<stem>+crop``, a random window of
2/3 of each side resized back to the working size; ``<stem>+hflip`` and ``<stem>+vflip``,
the resized photo flipped. Image and mask take the same window and flips (the study drew
them independently for the image and its mask, so its pairs drifted apart). The windows
are drawn per photo from ``(augment_seed, stem)``, so a re-run writes the same files, and
are recorded in the manifest. The train/test split is drawn over the original photos
first (the same split as without augmentation), and a test photo is cached as its resized
version only: no variant of a test photo reaches training. (The study augmented 400 ->
1600 images and then split, so flips and crops of its test photos were in its training
set.)

EXIF orientation is ignored, as by the loaders: the masks were drawn on the stored pixels.
Re-running skips every file that exists under its final name; files are written to a
temporary name in the same folder and moved with ``os.replace``, so a killed run never
leaves a half-written file under a final name.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
import warnings
import zlib
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segcore.data.classes import (SCHEMES, UNLABELED_BINARY, ClassScheme,
                                  scheme as make_scheme)
from segcore.data.layouts import (CACHE_FORMAT, CACHE_VERSION, MANIFEST, SETTINGS,
                                  DatasetError, DatasetIndex, Sample, check_pair,
                                  decode_mask, default_workers, discover, process_pool,
                                  read_manifest, split_samples)
from segcore.io import write_bytes_atomic

JPEG_SUBSAMPLING = "4:2:0"
_TMP_SUFFIX = ".tmp"
PREPARE_SCHEMES = SCHEMES + (UNLABELED_BINARY,)  # class maps train on a `full` cache
# The reference study's offline augmentation, in its order: --offline-augment n keeps the
# first n.
VARIANTS = ("resize", "crop", "hflip", "vflip")
CROP_FRACTION = 2 / 3


@dataclass
class PrepareResult:
    """What one :func:`prepare` call did.

    Attributes:
        out: the cache folder.
        manifest: the manifest written (or found unchanged).
        written: cached pairs (photos and their variants) converted by this call.
        reused: cached pairs whose files already existed (a finished earlier run).
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
    rgb, src = _decode_image(path, size)
    tw, th = target_size(*src, size)
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
    """One source pair and the cached pairs to make of it (``variants``, each written as
    ``images/<stem>.jpg`` + ``masks/<stem>.png`` with ``stem = variant_stem(...)``)."""

    sample: Sample
    variants: tuple[str, ...]
    out: Path
    kind: str
    classes: tuple
    lut: np.ndarray | None  # None: per-image targets (scheme.remap)
    scheme: ClassScheme
    size: int
    quality: int
    augment_seed: int = 0


@dataclass
class _Outcome:
    stem: str
    status: str  # written | reused | bad
    problems: list[str]
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # per cached stem
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    boxes: dict[str, list[int]] = field(default_factory=dict)  # crop windows, source px
    written: int = 0  # cached pairs written by this task
    reused: int = 0  # cached pairs found complete


def variant_stem(stem: str, variant: str) -> str:
    """The cached name of a variant: the photo's own stem for ``resize``."""
    return stem if variant == "resize" else f"{stem}+{variant}"


def crop_box(stem: str, width: int, height: int, seed: int) -> tuple[int, int, int, int]:
    """The study's random crop of one photo: a window of :data:`CROP_FRACTION` of each
    side, drawn from ``(seed, stem)`` (the same wherever and whenever it runs).

    Returns:
        (left, top, right, bottom) in source pixels.
    """
    cw, ch = max(1, round(width * CROP_FRACTION)), max(1, round(height * CROP_FRACTION))
    rng = np.random.default_rng([seed, zlib.crc32(stem.encode())])
    left = int(rng.integers(0, width - cw + 1))
    top = int(rng.integers(0, height - ch + 1))
    return left, top, left + cw, top + ch


def make_variant(image: Image.Image, labels: Image.Image, src: tuple[int, int],
                 out: tuple[int, int], variant: str,
                 box: tuple[int, int, int, int] | None = None) -> tuple[Image.Image, Image.Image]:
    """One variant of a pair, image and mask through the same geometry.

    Args:
        image: the photo, decoded at any scale of the source (a JPEG draft).
        labels: the mask's labels (mode L) at the source size.
        src: (width, height) of the source.
        out: (width, height) of the variant.
        variant: one of :data:`VARIANTS`.
        box: ``crop`` only: (left, top, right, bottom) in source pixels.

    Both resizes sample the same source window at the same output pixel centres: the
    image with a Lanczos filter, the mask nearest-neighbour (classes never blend).
    """
    window = box if variant == "crop" else (0, 0, *src)
    sx, sy = image.width / src[0], image.height / src[1]
    img_box = (window[0] * sx, window[1] * sy, window[2] * sx, window[3] * sy)
    if image.size != out or img_box != (0, 0, *image.size):
        # reducing_gap: a cheap box reduction first for large ratios, visually identical.
        image = image.resize(out, Image.Resampling.LANCZOS, box=img_box, reducing_gap=3.0)
    if labels.size != out or window != (0, 0, *labels.size):
        labels = labels.resize(out, Image.Resampling.NEAREST, box=window)
    flip = {"hflip": Image.Transpose.FLIP_LEFT_RIGHT,
            "vflip": Image.Transpose.FLIP_TOP_BOTTOM}.get(variant)
    if flip is not None:
        image, labels = image.transpose(flip), labels.transpose(flip)
    return image, labels


def _decode_image(path: Path, size: int,
                  margin: float = 1.0) -> tuple[Image.Image, tuple[int, int]]:
    """The RGB photo decoded at the smallest JPEG DCT scale that still holds its working
    size (long side ``size``) divided by ``margin`` (a crop of ``margin`` of each side
    then still holds the working size), and the source (width, height)."""
    with Image.open(path) as im:
        src = im.size
        tw, th = target_size(*src, size)
        need = (math.ceil(tw / margin), math.ceil(th / margin))
        if im.format == "JPEG" and need[0] < src[0] and need[1] < src[1]:
            im.draft("RGB", need)
        return im.convert("RGB"), src


def _read_target(path: Path, n: int) -> tuple[np.ndarray, tuple[int, int]]:
    with Image.open(path) as im:
        target = np.asarray(im)
    return np.bincount(target.ravel(), minlength=n)[:n], (target.shape[1], target.shape[0])


def _process(t: _Task) -> _Outcome:
    """Validate one pair and write its cached variants (runs in a worker process)."""
    s, n = t.sample, t.scheme.num_classes
    files = {v: (t.out / "images" / f"{variant_stem(s.stem, v)}.jpg",
                 t.out / "masks" / f"{variant_stem(s.stem, v)}.png") for v in t.variants}
    done = {v for v, (img, msk) in files.items() if img.is_file() and msk.is_file()}
    res = _Outcome(s.stem, "reused", [], reused=len(done))
    for v in done:
        stem = variant_stem(s.stem, v)
        res.counts[stem], res.sizes[stem] = _read_target(files[v][1], n)
    if len(done) == len(t.variants):
        if "crop" in done:  # the manifest records the window of a finished crop too
            with Image.open(s.image) as im:
                res.boxes[variant_stem(s.stem, "crop")] = list(
                    crop_box(s.stem, *im.size, t.augment_seed))
        return res

    image = img_size = decoded = None
    errors = []
    # Decode once for every variant; a decode that fails is left to check_pair, which
    # decodes the file again to report it in validate()'s words.
    try:
        image, img_size = _decode_image(s.image, t.size,
                                        CROP_FRACTION if "crop" in t.variants else 1.0)
    except Exception as e:  # any decoder error: reported below
        errors.append(f"corrupt image: {s.image} ({type(e).__name__}: {e})")
    try:
        decoded = decode_mask(s.mask, t.kind, t.classes)
    except Exception as e:  # as above
        errors.append(f"corrupt mask: {s.mask} ({type(e).__name__}: {e})")
    # validate()'s checks, on the arrays decoded above: each full-size mask is decoded
    # once, not once to validate and again to convert.
    problems = check_pair(s, t.kind, t.classes, decoded=decoded, image_size=img_size)
    if errors and not problems:
        problems = errors  # a file the cheaper check accepts but the conversion cannot read
    if problems:
        return _Outcome(s.stem, "bad", problems)

    out_size = target_size(*img_size, t.size)
    labels = Image.fromarray(decoded[0])
    for v in t.variants:
        stem = variant_stem(s.stem, v)
        box = crop_box(s.stem, *img_size, t.augment_seed) if v == "crop" else None
        if box is not None:
            res.boxes[stem] = list(box)
        if v in done:
            continue
        img_v, lab_v = make_variant(image, labels, img_size, out_size, v, box)
        # Remap after the resize: nearest sampling commutes with a lookup, the lookup
        # then touches the small array only, and a per-image rule sees the image as cached.
        lab = np.asarray(lab_v)
        target = t.scheme.remap(lab, t.classes) if t.lut is None else t.lut[lab]
        write_atomic(files[v][0], _encode(img_v, "JPEG", quality=t.quality, subsampling=2))
        write_atomic(files[v][1], _encode(Image.fromarray(target), "PNG"))
        res.counts[stem] = np.bincount(target.ravel(), minlength=n)[:n]
        res.sizes[stem] = out_size
        res.written += 1
    res.status = "written"
    return res


def _settings(index: DatasetIndex, sch: ClassScheme, size: int, quality: int,
              offline_augment: int, augment_seed: int) -> dict:
    """What the cached files depend on: a re-run with other settings must not reuse them.
    (Keys that only exist for some settings are left out otherwise, so a cache prepared
    before they existed still matches.)"""
    d = {"format": CACHE_FORMAT, "version": CACHE_VERSION,
         "source": str(index.root.resolve()), "layout": index.layout,
         "scheme": sch.name, "names": list(sch.names), "size": size, "quality": quality}
    if sch.threshold is not None:
        d["threshold"] = sch.threshold
    if offline_augment > 1:
        d.update(offline_augment=offline_augment, augment_seed=augment_seed)
    return d


def _check_args(size, classes, quality, workers, test_fraction, offline_augment,
                unlabeled_threshold) -> None:
    from segcore.config import ConfigError

    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"size = {size!r} must be a positive number of pixels (--size)")
    if classes not in PREPARE_SCHEMES:
        raise ConfigError(f"classes = {classes!r} is unknown; choose one of "
                          f"{', '.join(PREPARE_SCHEMES)} (--classes; for a class map, "
                          "prepare --classes full and train with --class-map)")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ConfigError(f"quality = {quality!r} must be a JPEG quality from 1 to 100 "
                          "(--quality; 90 is the default)")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers = {workers!r} must be at least 1 (--workers)")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction = {test_fraction!r} must be between 0 and 1 "
                          "(exclusive), e.g. 0.15 (--test-fraction)")
    if not isinstance(offline_augment, int) or not 1 <= offline_augment <= len(VARIANTS):
        raise ConfigError(f"offline_augment = {offline_augment!r} must be 1 (no offline "
                          f"augmentation) to {len(VARIANTS)} (the study's variants "
                          f"{', '.join(VARIANTS)}) (--offline-augment)")
    if unlabeled_threshold is not None:
        if classes != UNLABELED_BINARY:
            raise ConfigError(f"--unlabeled-threshold applies to --classes "
                              f"{UNLABELED_BINARY}, not {classes}")
        if not math.isfinite(unlabeled_threshold):
            raise ConfigError(f"unlabeled_threshold = {unlabeled_threshold!r} must be a finite "
                              "number, e.g. 0.5 (the study's code) or 0 (the mean) "
                              "(--unlabeled-threshold)")


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
                 "quality": "--quality", "threshold": "--unlabeled-threshold",
                 "offline_augment": "--offline-augment", "augment_seed": "--augment-seed"}
        keys = list(settings) + [k for k in previous if k not in settings]
        unset = {"offline_augment": 1}  # keys left out of the settings at their default

        def shown(d: dict, k: str):
            return d.get(k, unset.get(k, "not set"))

        diff = ", ".join(f"{flags.get(k, k)} {shown(previous, k)} (now {shown(settings, k)})"
                         for k in keys if previous.get(k) != settings.get(k)
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
            test_fraction: float = 0.15, seed: int = 0, progress: bool = False,
            offline_augment: int = 1, augment_seed: int = 0,
            unlabeled_threshold: float | None = None) -> PrepareResult:
    """Validate ``src`` and write the working-resolution cache to ``out``.

    Args:
        src: a dataset folder in any layout :func:`discover` knows (not a cache).
        out: the cache folder (created; re-using one finishes or refreshes it).
        size: long side of the cached images in pixels (smaller sources stay as they are).
        classes: class scheme the cached masks are remapped to (:data:`PREPARE_SCHEMES`).
        quality: JPEG quality of the cached images.
        strict: fail on any problem (after caching the good pairs; no manifest is
            written) instead of skipping bad pairs with a warning. Either way every
            problem, pairing and file alike, is named in one message.
        workers: processes (default: the cores this process may use).
        test_fraction, seed: the held-out split recorded in the manifest.
        progress: draw a tqdm progress bar on stderr.
        offline_augment: 1 to 4: cache the first n of the study's :data:`VARIANTS` of
            each training photo (see the module docstring).
        augment_seed: seed of the crop windows.
        unlabeled_threshold: ``unlabeled-binary``: the standardized-gray cut (default 0.5).

    With ``workers > 1`` the pool spawns clean processes, so a script calling this must
    guard its entry point with ``if __name__ == "__main__":`` (the usual multiprocessing
    rule; ``launch/prepare.py`` does). The workers die with the calling process.

    Returns:
        A :class:`PrepareResult`.

    Raises:
        ConfigError: an argument out of range.
        DatasetError: missing or unrecognised ``src``, unwritable ``out``, a cache of other
            settings in ``out``, no valid pair, or (``strict``) any problem.
    """
    t0 = time.perf_counter()
    _check_args(size, classes, quality, workers, test_fraction, offline_augment,
                unlabeled_threshold)
    src, out = Path(src), Path(out)
    workers = workers or default_workers()
    if not src.is_dir():
        raise DatasetError(f"--src {src} does not exist or is not a folder; pass the folder "
                           "of the Semantic Drone Dataset")
    _check_out_writable(out)
    # Pairing problems are collected, not reported yet: --strict names every problem,
    # pairing and file alike, in one message after every pair has been checked.
    index = discover(src, strict=False, report=False)
    if index.layout == "cache":
        raise DatasetError(f"--src {src} is already a prepared cache; pass the original "
                           "dataset folder")
    sch = make_scheme(classes, threshold=unlabeled_threshold)
    lut = index.target_lut(sch)
    settings = _settings(index, sch, size, quality, offline_augment, augment_seed)
    _open_out(out, settings)

    def tasks(samples, variants):
        return [_Task(s, variants, out, index.mask_kind, index.classes, lut, sch, size,
                      quality, augment_seed) for s in samples]

    outcomes = _run(tasks(index.samples, VARIANTS[:1]), workers, progress)
    problems = list(index.problems) + [line for o in outcomes if o.status == "bad"
                                       for line in o.problems]
    good = {o.stem: o for o in outcomes if o.status != "bad"}
    train = test = []
    if len(good) >= 2:
        # The split is drawn over the original photos, before any variant exists.
        train, test = split_samples([s for s in index.samples if s.stem in good],
                                    test_fraction, seed)
        if offline_augment > 1:
            extra = _run(tasks(train, VARIANTS[1:offline_augment]), workers, progress)
            problems += [line for o in extra if o.status == "bad" for line in o.problems]
            for o in extra:
                if o.status == "bad":  # the files changed since the first pass
                    good.pop(o.stem, None)
                else:
                    _merge(good[o.stem], o)
            train = [s for s in train if s.stem in good]
            outcomes += extra
    if problems:
        msg = f"{len(problems)} problem(s) in {src}:\n  " + "\n  ".join(problems)
        if strict:
            raise DatasetError(msg + f"\n(--strict: the good pairs are cached in {out}; fix "
                               "these files and re-run, or drop --strict to skip them)")
        warnings.warn(msg + "\n(these pairs are skipped; pass --strict to fail instead)",
                      stacklevel=2)
    if len(good) < 2:
        raise DatasetError(f"{src} has {len(good)} valid pair(s); a train/test split needs "
                           "at least 2")

    train_stems = sorted(stem for s in train for stem in good[s.stem].counts)
    counts = np.zeros(sch.num_classes, dtype=np.int64)
    for s in train:
        for c in good[s.stem].counts.values():
            counts += c
    total = max(1, int(counts.sum()))
    scheme_entry = {"name": sch.name, "names": list(sch.names),
                    "colors": [list(c) for c in sch.colors]}
    if sch.threshold is not None:
        scheme_entry["threshold"] = sch.threshold
    manifest = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "settings": settings,
        "source": settings["source"], "layout": index.layout,
        "class_table": str(index.class_csv) if index.class_csv else "built-in SDD table",
        "source_classes": [[n, list(c)] for n, c in index.classes],
        "scheme": scheme_entry,
        "size": size, "quality": quality, "image_format": "JPEG",
        "jpeg_subsampling": JPEG_SUBSAMPLING, "mask_format": "PNG mode L, target indices",
        "split": {"test_fraction": test_fraction, "seed": seed,
                  "train": train_stems, "test": [s.stem for s in test]},
        "image_sizes": {stem: list(wh) for o in good.values() for stem, wh in o.sizes.items()},
        # Counted at cache resolution (nearest-neighbour): close to the full-size shares.
        "class_pixels_train": counts.tolist(),
        "class_frequency_train": [c / total for c in counts.tolist()],
        "skipped": problems,
    }
    if offline_augment > 1:
        manifest["offline_augment"] = {
            "copies": offline_augment, "variants": list(VARIANTS[:offline_augment]),
            "seed": augment_seed, "crop_fraction": CROP_FRACTION,
            "paired": True, "split_over": "original photos; test photos unaugmented",
            "crop_boxes": {stem: box for s in train for stem, box in
                           sorted(good[s.stem].boxes.items())},
        }
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    path = out / MANIFEST
    if not (path.is_file() and path.read_text() == text):
        write_atomic(path, text.encode())
    written = sum(o.written for o in outcomes)
    reused = sum(o.reused for o in outcomes if o.status != "bad")
    return PrepareResult(out, manifest, written, reused, problems, time.perf_counter() - t0)


def _merge(into: _Outcome, more: _Outcome) -> None:
    """Add a second pass's variants of the same photo to its first outcome."""
    into.counts.update(more.counts)
    into.sizes.update(more.sizes)
    into.boxes.update(more.boxes)


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
