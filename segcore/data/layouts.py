"""Dataset discovery and validation: find image/mask pairs in the layouts people have.

:func:`discover` returns a :class:`DatasetIndex`, the one object the loaders use to list
samples and to read an image or a mask already remapped to a class scheme. Recognised
layouts, tried in this order:

``cache``
    a folder written by ``launch/prepare.py`` (``manifest.json``, ``images/*.jpg``,
    ``masks/*.png`` holding *target* indices of the scheme it was prepared for).
``kaggle``
    ``[dataset/semantic_drone_dataset/]original_images/NNN.jpg`` with index masks in
    ``label_images_semantic/NNN.png`` (0-23), ``class_dict_seg.csv`` beside them or at the
    root (``name, r, g, b`` with a space after each comma). Without
    ``label_images_semantic/`` the ``RGB_color_image_masks/`` colour masks are used.
``tugraz``
    ``[semantic_drone_dataset/]training_set/images/`` with RGB colour masks in
    ``training_set/gt/semantic/label_images/`` and ``class_dict.csv`` at the root or in
    ``training_set/gt/semantic/``.
``plain``
    ``images/`` + ``masks/`` with ``classes.csv`` or ``class_dict*.csv``; masks are index
    PNGs or RGB colour PNGs (detected from the first mask's mode).

Images and masks pair by file stem. :func:`discover` checks pairing only (cheap: no file is
opened); :func:`validate` opens every pair and reports corrupt files, size mismatches and
mask values or colours that are not in the class table. Both list every problem at once
with the file names; ``strict`` raises :class:`DatasetError`, otherwise the bad pairs are
skipped with one warning that lists them.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from segcore.data.classes import IGNORE_INDEX, SDD_CLASSES, SDD_NAMES, ClassScheme, read_class_csv
from segcore.faults import die_with_parent

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
LAYOUTS = ("cache", "kaggle", "tugraz", "plain")
MANIFEST = "manifest.json"
CACHE_FORMAT = "segbench-cache"
CACHE_VERSION = 1
# Written by prepare before its first file: a cache folder without a manifest but with
# this file is an unfinished run, not a plain dataset.
SETTINGS = ".prepare.json"
MASK_KINDS = ("index", "rgb", "target")
# Rows of a colour mask converted per chunk: bounds the int64 temporaries of
# np.searchsorted to ~12 MB for a 6000-wide mask.
_ROWS_PER_CHUNK = 256


class DatasetError(ValueError):
    """The dataset folder is missing, empty or holds bad files; the message says which."""



def split_samples(samples: Sequence[Sample], test_fraction: float = 0.15,
                  seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train/test split: the same stems land in the test set for a seed.

    Returns:
        (train, test), each sorted by stem; test holds ``ceil(test_fraction * n)`` samples
        (at least 1, and at least 1 sample is left for training).
    """
    ordered = sorted(samples, key=lambda s: s.stem)
    n = len(ordered)
    if n < 2:
        raise ValueError(f"need at least 2 samples to split into train and test, found {n}")
    n_test = min(max(1, math.ceil(test_fraction * n)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    test_idx = set(perm[:n_test].tolist())
    train = [s for i, s in enumerate(ordered) if i not in test_idx]
    test = [s for i, s in enumerate(ordered) if i in test_idx]
    return train, test


@dataclass(frozen=True)
class Sample:
    stem: str
    image: Path
    mask: Path


@dataclass
class DatasetIndex:
    """The pairs found under a dataset root and how to read them.

    Attributes:
        root: the folder given by the user.
        layout: which layout matched (one of :data:`LAYOUTS`).
        classes: the class table ``((name, (r, g, b)), ...)`` in label-index order. For a
            prepared cache it is the target scheme's table (its masks hold target indices).
        samples: valid pairs, sorted by stem.
        problems: one line per skipped file or pair (empty when all is well).
        mask_kind: ``index`` (mask pixels are label indices), ``rgb`` (colours of the class
            table) or ``target`` (a prepared cache: indices of ``manifest['scheme']``).
        class_csv: the class table file read, or ``None`` (built-in SDD table used).
        manifest: the prepared cache's manifest (``None`` for other layouts).
    """

    root: Path
    layout: str
    classes: tuple
    samples: list[Sample]
    problems: list[str] = field(default_factory=list)
    mask_kind: str = "index"
    class_csv: Path | None = None
    manifest: dict[str, Any] | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data without decoding it: a hash of every pair's names and
        byte sizes (and of the manifest, for a prepared cache), and the pair count. A
        dataset re-prepared at the same path gets another one."""
        import hashlib

        h = hashlib.sha256()
        if self.manifest is not None:
            h.update(json.dumps(self.manifest, sort_keys=True).encode())
        for s in self.samples:
            for p in (s.image, s.mask):
                h.update(f"{p.name}\0{p.stat().st_size}\n".encode())
        return {"data_fingerprint": h.hexdigest()[:16], "data_pairs": len(self.samples)}

    # -- splits -------------------------------------------------------------------------
    def split(self, test_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
        """(train, test) samples: deterministic per seed (see ``split_samples``).

        A prepared cache returns the split recorded in its manifest (so every run on the
        cache evaluates on the same images), warning if ``test_fraction``/``seed`` differ
        from the ones it was prepared with.
        """
        if self.manifest is None:
            return split_samples(self.samples, test_fraction, seed)
        sp = self.manifest["split"]
        if (abs(sp["test_fraction"] - test_fraction) > 1e-9 or sp["seed"] != seed):
            warnings.warn(
                f"{self.root} holds the split prepared with test fraction "
                f"{sp['test_fraction']}, seed {sp['seed']}; using it instead of the requested "
                f"{test_fraction}, seed {seed} (re-run launch/prepare.py with --test-fraction "
                "and --seed to change it)", stacklevel=2)
        by_stem = {s.stem: s for s in self.samples}
        train = [by_stem[s] for s in sp["train"] if s in by_stem]
        test = [by_stem[s] for s in sp["test"] if s in by_stem]
        return train, test

    # -- reading ------------------------------------------------------------------------
    def load_image(self, sample: Sample) -> np.ndarray:
        """RGB uint8 array (H, W, 3)."""
        with Image.open(sample.image) as im:
            return np.asarray(im.convert("RGB"))

    def read_labels(self, sample: Sample) -> np.ndarray:
        """The mask as label indices of :attr:`classes`, uint8 (H, W); colours or values
        outside the table read as ``IGNORE_INDEX`` (255) when they cannot be represented."""
        return read_labels(sample.mask, self.mask_kind, self.classes)

    def target_lut(self, scheme: ClassScheme) -> np.ndarray | None:
        """256-entry uint8 table from label index (as :meth:`read_labels` returns) to
        ``scheme`` target index; ``IGNORE_INDEX`` for labels outside the class table.

        ``None`` when the targets are a function of the whole label image
        (``unlabeled-binary`` on source labels): :meth:`targets` computes them.

        A prepared cache serves the scheme it was prepared for, and a cache prepared with
        ``--classes full`` (whose masks are the source labels) serves every scheme.

        Raises:
            DatasetError: a prepared cache asked for another scheme than its own, or a
                class table naming classes the schemes do not know.
        """
        n = len(self.classes)
        if self.mask_kind == "target" and not self._cache_holds_labels():
            m = self.manifest or {}
            ms = m.get("scheme", {})
            if ms.get("name") != scheme.name or tuple(ms.get("names", ())) != scheme.names:
                raise DatasetError(
                    f"{self.root} was prepared for --classes {ms.get('name')} and its masks "
                    f"hold those indices; re-run launch/prepare.py --src {m.get('source')} "
                    f"--out NEW_DIR --classes {_prepare_classes(scheme)} to train on "
                    f"{scheme.name}")
            if ms.get("threshold") != scheme.threshold:
                raise DatasetError(
                    f"{self.root} was prepared with --unlabeled-threshold "
                    f"{ms.get('threshold')}, not {scheme.threshold}; re-run "
                    f"launch/prepare.py --src {m.get('source')} --out NEW_DIR --classes "
                    f"{scheme.name} --unlabeled-threshold {scheme.threshold}")
            lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
            lut[:n] = np.arange(n, dtype=np.uint8)
            return lut
        if scheme.per_image:
            return None
        names = [c[0] for c in self.classes]
        if tuple(names) == SDD_NAMES[:n]:
            lut = scheme.lut.copy()
            lut[n:] = IGNORE_INDEX  # the table is shorter than SDD's: higher labels are unknown
            return lut
        # A custom table (subset or other order): schemes are defined over the SDD class
        # names, so map each label through its name.
        unknown = [nm for nm in names if nm not in SDD_NAMES]
        if unknown:
            raise DatasetError(
                f"class table {self.class_csv} names class(es) {unknown} that are not "
                f"Semantic Drone Dataset classes; rename them to one of {', '.join(SDD_NAMES)}")
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[:n] = scheme.lut[[SDD_NAMES.index(nm) for nm in names]]
        return lut

    def _cache_holds_labels(self) -> bool:
        """A cache prepared with ``--classes full``: its masks are the 24 source labels."""
        ms = (self.manifest or {}).get("scheme", {})
        return ms.get("name") == "full" and tuple(ms.get("names", ())) == SDD_NAMES

    def targets(self, labels: np.ndarray, scheme: ClassScheme) -> np.ndarray:
        """Labels (as :meth:`read_labels` returns them) -> ``scheme`` target indices, one
        vectorised pass (a lookup table, or the per-image rule of ``unlabeled-binary``)."""
        lut = self.target_lut(scheme)
        return scheme.remap(labels, self.classes) if lut is None else lut[labels]

    def load_mask(self, sample: Sample, scheme: ClassScheme) -> np.ndarray:
        """Mask remapped to ``scheme`` target indices, uint8 (H, W).

        Raises:
            DatasetError: the mask holds values or colours outside the class table, or a
                prepared cache was prepared for another scheme.
        """
        src = self.read_labels(sample)
        out = self.targets(src, scheme)
        if (out == IGNORE_INDEX).any():
            if self.mask_kind == "rgb":
                raise DatasetError(
                    f"mask {sample.mask} holds colour(s) that are not in the class table "
                    f"{self.class_csv or 'built-in SDD table'}; fix the mask or the table, or "
                    "run launch/prepare.py without --strict to skip such pairs")
            bad = np.unique(src[out == IGNORE_INDEX])[:10].tolist()
            raise DatasetError(
                f"mask {sample.mask} holds value(s) {bad} that are not in the class table "
                f"(0-{len(self.classes) - 1}); fix the mask or the class table, or run "
                "launch/prepare.py without --strict to skip such pairs")
        return out


def _prepare_classes(scheme: ClassScheme) -> str:
    """The ``prepare.py --classes`` value that caches ``scheme``: a class map trains on a
    ``full`` cache."""
    return scheme.name if scheme.class_map is None else "full"


# -- mask decoding ------------------------------------------------------------------------
def colors_to_labels(rgb: np.ndarray, classes) -> np.ndarray:
    """RGB colour mask (H, W, 3) -> label indices uint8 (H, W); unknown colours -> IGNORE_INDEX.

    Vectorised: each colour packs into one int (r << 16 | g << 8 | b) and is looked up
    in the sorted table with ``np.searchsorted``, a chunk of rows at a time.
    """
    table = np.array([(r << 16) | (g << 8) | b for _, (r, g, b) in classes], dtype=np.int64)
    order = np.argsort(table, kind="stable")
    sorted_t = table[order]
    out = np.empty(rgb.shape[:2], dtype=np.uint8)
    for r0 in range(0, rgb.shape[0], _ROWS_PER_CHUNK):
        c = rgb[r0:r0 + _ROWS_PER_CHUNK, :, :3]
        packed = ((c[..., 0].astype(np.int64) << 16) | (c[..., 1].astype(np.int64) << 8)
                  | c[..., 2])
        pos = np.minimum(np.searchsorted(sorted_t, packed), len(sorted_t) - 1)
        hit = sorted_t[pos] == packed
        out[r0:r0 + _ROWS_PER_CHUNK] = np.where(hit, order[pos], IGNORE_INDEX)
    return out


def decode_mask(path: Path, kind: str, classes) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a mask file to label indices.

    Args:
        path: the mask file.
        kind: ``index``/``target`` (pixel values are indices; a 3-channel file is read
            from its first channel) or ``rgb`` (colours looked up in ``classes``; a
            single-channel file is read as indices).
        classes: the class table ``((name, (r, g, b)), ...)``.

    Returns:
        (labels uint8 (H, W) with ``IGNORE_INDEX`` where a value or colour cannot be a label,
        the decoded colour array (H, W, 3+) when the file was read as colours, else None).
    """
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        if kind == "rgb" and arr.shape[2] >= 3:
            return colors_to_labels(arr, classes), arr
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        # 16/32-bit index PNGs: values above 255 cannot be labels.
        arr = np.where((arr < 0) | (arr > 255), IGNORE_INDEX, arr).astype(np.uint8)
    return arr, None


def read_labels(path: Path, kind: str, classes) -> np.ndarray:
    """Label indices of a mask file (see :func:`decode_mask`), uint8 (H, W)."""
    return decode_mask(path, kind, classes)[0]


# -- layouts ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Found:
    layout: str
    image_dir: Path
    mask_dir: Path
    kind: str  # index | rgb | auto
    csv_candidates: tuple[Path, ...]


def _kaggle(root: Path) -> _Found | None:
    for base in (root, root / "dataset" / "semantic_drone_dataset",
                 root / "semantic_drone_dataset"):
        img = base / "original_images"
        if not img.is_dir():
            continue
        csvs = (base / "class_dict_seg.csv", root / "class_dict_seg.csv",
                root / "dataset" / "class_dict_seg.csv", base.parent / "class_dict_seg.csv")
        if (base / "label_images_semantic").is_dir():
            return _Found("kaggle", img, base / "label_images_semantic", "index", csvs)
        # The Kaggle download nests its colour masks one level deep.
        for rgb in (root / "RGB_color_image_masks" / "RGB_color_image_masks",
                    root / "RGB_color_image_masks", base / "RGB_color_image_masks"):
            if rgb.is_dir() and any(p.suffix.lower() == ".png" for p in rgb.iterdir()):
                return _Found("kaggle", img, rgb, "rgb", csvs)
    return None


def _tugraz(root: Path) -> _Found | None:
    for ts in (root / "training_set", root / "semantic_drone_dataset" / "training_set", root):
        img, msk = ts / "images", ts / "gt" / "semantic" / "label_images"
        if img.is_dir() and msk.is_dir():
            csvs = (root / "class_dict.csv", ts / "gt" / "semantic" / "class_dict.csv",
                    ts / "class_dict.csv", ts.parent / "class_dict.csv",
                    root / "class_dict_seg.csv")
            return _Found("tugraz", img, msk, "rgb", csvs)
    return None


def _plain(root: Path) -> _Found | None:
    img, msk = root / "images", root / "masks"
    if not (img.is_dir() and msk.is_dir()):
        return None
    csvs = (root / "classes.csv",) + tuple(sorted(root.glob("class_dict*.csv")))
    return _Found("plain", img, msk, "auto", csvs)


def _files_by_stem(folder: Path, what: str, problems: list[str]) -> dict[str, Path]:
    """Image files by stem; two files sharing a stem are a problem (which one is meant?)."""
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        # Dot files include prepare's temporary names: never data.
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS:
            by_stem.setdefault(p.stem, []).append(p)
    out = {}
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            problems.append(f"{len(paths)} {what}s share the stem {stem!r}: "
                            f"{', '.join(str(p) for p in paths)} (keep one)")
        else:
            out[stem] = paths[0]
    return out


def _mask_kind_from_file(path: Path) -> str:
    """``rgb`` for a colour mask (mode RGB/RGBA), ``index`` otherwise (L, P, I, I;16)."""
    try:
        with Image.open(path) as im:
            return "rgb" if im.mode in ("RGB", "RGBA") else "index"
    except OSError:
        return "index"  # undecodable: validate() reports it


def _report(root: Path, problems: list[str], strict: bool, what: str) -> None:
    if not problems:
        return
    msg = f"{len(problems)} problem(s) in {root}:\n  " + "\n  ".join(problems)
    if strict:
        raise DatasetError(msg + "\n(--strict: fix these files, or drop --strict to skip the "
                           f"bad {what})")
    warnings.warn(msg + f"\n(these {what} are skipped; pass --strict to fail instead)",
                  stacklevel=3)


def _discover_cache(root: Path, manifest: dict[str, Any], strict: bool) -> DatasetIndex:
    if manifest.get("version", 0) > CACHE_VERSION:
        raise DatasetError(f"{root / MANIFEST} was written by a newer segbench (cache version "
                           f"{manifest.get('version')}); update segbench or re-run prepare")
    sc = manifest["scheme"]
    classes = tuple((n, tuple(c)) for n, c in zip(sc["names"], sc["colors"]))
    problems, samples = [], []
    for stem in sorted(manifest["split"]["train"] + manifest["split"]["test"]):
        s = Sample(stem, root / "images" / f"{stem}.jpg", root / "masks" / f"{stem}.png")
        missing = [str(p) for p in (s.image, s.mask) if not p.is_file()]
        if missing:
            problems.append(f"listed in the manifest but missing: {', '.join(missing)}")
        else:
            samples.append(s)
    _report(root, problems, strict, "pairs")
    if not samples:
        raise DatasetError(f"the prepared cache {root} lists no readable pairs; re-run "
                           "launch/prepare.py")
    return DatasetIndex(root, "cache", classes, samples, problems, mask_kind="target",
                        class_csv=None, manifest=manifest)


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The cache manifest under ``root``, or ``None`` if ``root`` is not a prepared cache."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} cannot be read ({e}); delete it and re-run "
                           "launch/prepare.py") from None
    return m if isinstance(m, dict) and m.get("format") == CACHE_FORMAT else None


def discover(root: str | Path, strict: bool = False, validate_files: bool = False,
             workers: int = 1, report: bool = True) -> DatasetIndex:
    """Find the image/mask pairs under ``root``.

    Args:
        root: dataset folder in one of the :data:`LAYOUTS` (see the module docstring).
        strict: raise on any problem instead of skipping the bad pairs with a warning.
        validate_files: also open every pair (see :func:`validate`); otherwise only the
            pairing is checked, which opens no file.
        workers: processes for ``validate_files``.
        report: warn about (or, ``strict``, raise on) pairing problems here; ``False``
            leaves them in ``index.problems`` for a caller that reports every problem at
            once (``prepare``).

    Returns:
        The index of valid pairs, sorted by stem.

    Raises:
        DatasetError: no such folder, no recognised layout, an unreadable class table, no
            pairs, or (``strict``) any problem.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; pass --data DIR with the "
                           "Semantic Drone Dataset, or --data synthetic")
    manifest = read_manifest(root)
    if manifest is not None:
        index = _discover_cache(root, manifest, strict and report)
    else:
        if (root / SETTINGS).is_file():
            raise DatasetError(f"{root} is an unfinished prepare run (no {MANIFEST}); re-run "
                               "launch/prepare.py with the same --src and --out to finish it")
        found = _kaggle(root) or _tugraz(root) or _plain(root)
        if found is None:
            raise DatasetError(
                f"{root} holds no recognised layout: expected original_images/ + "
                "label_images_semantic/ (Kaggle), training_set/images/ + "
                "training_set/gt/semantic/label_images/ (TU Graz), images/ + masks/ with a "
                "class table CSV, or a cache written by launch/prepare.py")
        csv = next((p for p in found.csv_candidates if p.is_file()), None)
        try:
            classes = read_class_csv(csv) if csv else SDD_CLASSES
        except (OSError, ValueError) as e:
            # read_class_csv's own errors name the file and line already.
            what = str(e) if isinstance(e, ValueError) else f"class table {csv} cannot be " \
                f"read: {e.strerror or e}"
            raise DatasetError(f"{what}; the table needs a header 'name, r, g, b' and one "
                               "row per class") from None
        if not classes or len(classes) > 255:
            raise DatasetError(f"class table {csv} holds {len(classes)} classes; expected "
                               "1 to 255 rows of 'name, r, g, b'")
        problems: list[str] = []
        images = _files_by_stem(found.image_dir, "image", problems)
        masks = _files_by_stem(found.mask_dir, "mask", problems)
        problems += [f"image without mask: {images[s]} (no {s}.* in {found.mask_dir})"
                     for s in sorted(set(images) - set(masks))]
        problems += [f"mask without image: {masks[s]} (no {s}.* in {found.image_dir})"
                     for s in sorted(set(masks) - set(images))]
        samples = [Sample(s, images[s], masks[s]) for s in sorted(set(images) & set(masks))]
        kind = found.kind
        if kind == "auto":
            kind = _mask_kind_from_file(samples[0].mask) if samples else "index"
        if kind == "rgb":
            colors = [c for _, c in classes]
            dup = sorted({c for c in colors if colors.count(c) > 1})
            if dup:
                raise DatasetError(f"class table {csv or 'built-in'} gives colour(s) {dup} to "
                                   "several classes; colour masks need one colour per class")
        if report:
            _report(root, problems, strict, "files")
        if not samples:
            raise DatasetError(f"no image/mask pairs found under {root} (layout "
                               f"{found.layout}: {found.image_dir}, {found.mask_dir})")
        index = DatasetIndex(root, found.layout, classes, samples, problems, mask_kind=kind,
                             class_csv=csv)
    if validate_files:
        validate(index, check_values=True, workers=workers, strict=strict)
    return index


# -- validation -----------------------------------------------------------------------------
def _check_image(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """(size, problem): decode cheaply enough to catch corrupt and truncated files."""
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "JPEG":
                # A 1/8-scale DCT decode still reads the whole entropy-coded stream, so
                # truncation and corruption surface, at a fraction of a full decode.
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()
            else:
                im.verify()  # chunk CRCs; verify() leaves the file unusable, reopen to decode
        if im.format != "JPEG":
            with Image.open(path) as im2:
                im2.load()
        return size, None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        return None, f"corrupt image: {path} ({type(e).__name__}: {e})"


def check_pair(sample: Sample, kind: str, classes, check_values: bool = True,
               decoded: tuple[np.ndarray, np.ndarray | None] | None = None,
               image_size: tuple[int, int] | None = None) -> list[str]:
    """Problems of one pair (empty if it is good): corrupt image or mask, size mismatch,
    mask values or colours outside the class table. The per-pair body of :func:`validate`,
    also run by ``prepare`` on the arrays it decodes anyway.

    Args:
        sample: the pair.
        kind: the index's ``mask_kind``.
        classes: the class table.
        check_values: decode the whole mask and check its values (otherwise headers and
            a cheap decode only).
        decoded: the mask already decoded by :func:`decode_mask` (saves a second decode).
        image_size: (width, height) of the image, which the caller decoded successfully
            (skips the image check).

    Returns:
        One line per problem, each naming the file.
    """
    problems = []
    img_size = image_size
    if img_size is None:
        img_size, err = _check_image(sample.image)
        if err:
            problems.append(err)
    try:
        with Image.open(sample.mask) as im:
            mask_size = im.size
            if not check_values:
                im.verify()
        if check_values and decoded is None:
            decoded = decode_mask(sample.mask, kind, classes)
    except Exception as e:  # as in _check_image: any decoder error means a bad file
        problems.append(f"corrupt mask: {sample.mask} ({type(e).__name__}: {e})")
        return problems
    if img_size is not None and img_size != mask_size:
        problems.append(f"size mismatch: image {sample.image} is {img_size[0]}x{img_size[1]} "
                        f"but mask {sample.mask} is {mask_size[0]}x{mask_size[1]}")
    if check_values and decoded is not None:
        problems += _value_problems(sample.mask, decoded, len(classes))
    return problems


def _value_problems(path: Path, decoded, n: int) -> list[str]:
    labels, colors = decoded
    bad = labels >= n  # includes IGNORE_INDEX
    if not bad.any():
        return []
    if colors is not None:
        cols = np.unique(colors[..., :3][bad], axis=0)
        shown = [tuple(int(v) for v in c) for c in cols[:8]]
        more = f" and {len(cols) - 8} more" if len(cols) > 8 else ""
        return [f"unknown mask colours {shown}{more} in {path} (not in the class table; "
                f"{int(bad.sum())} pixels)"]
    vals = np.unique(labels[bad])
    more = f" and {len(vals) - 10} more" if len(vals) > 10 else ""
    return [f"unknown mask values {vals[:10].tolist()}{more} in {path} (the class table has "
            f"0-{n - 1}; {int(bad.sum())} pixels)"]


def _check_task(args) -> list[str]:
    return check_pair(*args)


def validate(index: DatasetIndex, check_values: bool = True, workers: int = 1,
             strict: bool = False) -> list[str]:
    """Open every pair and report all problems at once.

    Checks: corrupt or truncated image and mask files, image/mask size mismatches and
    (``check_values``) mask values or colours outside the class table. Bad pairs are
    removed from ``index.samples`` and their lines appended to ``index.problems``, so the
    index lists only pairs the loaders can read.

    Args:
        index: from :func:`discover`; pruned in place.
        check_values: decode whole masks to check their values (the expensive part).
        workers: processes to spread the files over (1 = in this process).
        strict: raise instead of pruning.

    With ``workers > 1``, a script calling this needs the ``if __name__ == "__main__":``
    guard (the pool starts clean processes, see :func:`process_pool`).

    Returns:
        The problem lines found (empty if every pair is good).

    Raises:
        DatasetError: ``strict`` and a problem was found, or no good pair is left.
    """
    tasks = [(s, index.mask_kind, index.classes, check_values) for s in index.samples]
    if workers > 1 and len(tasks) > 1:
        with process_pool(workers) as ex:
            results = list(ex.map(_check_task, tasks,
                                  chunksize=max(1, len(tasks) // (4 * workers))))
    else:
        results = [_check_task(t) for t in tasks]
    problems = [line for r in results for line in r]
    if problems:
        _report(index.root, problems, strict, "pairs")
        bad = {s.stem for s, r in zip(index.samples, results) if r}
        index.samples = [s for s in index.samples if s.stem not in bad]
        index.problems.extend(problems)
        if not index.samples:
            raise DatasetError(f"no valid image/mask pair left under {index.root}")
    return problems


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers start clean and die with this process.

    Clean: forking a parent that runs torch/DALI/OpenMP threads can deadlock a child, so
    workers are spawned. Dying: each worker asks the kernel for SIGKILL when its parent
    dies (``PR_SET_PDEATHSIG``, Linux), so a ``kill -9`` of the caller leaves no worker
    behind, and with them gone the resource tracker sees its pipe close and exits too.
    (A forkserver would be the workers' parent instead, and it outlives the caller.) The
    signal follows the thread that started the worker: submit from a thread that lives
    as long as the pool (the pool starts workers on submit).
    """
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                               initializer=die_with_parent, initargs=(os.getpid(),))


def default_workers() -> int:
    """The CPU cores this process may use."""
    from segcore.host import usable_cores

    return usable_cores()
