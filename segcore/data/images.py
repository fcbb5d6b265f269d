"""Photos and truth masks outside a dataset layout: the folders prediction reads.

:mod:`segcore.data.layouts` reads the pairs of a training dataset; this module reads a
plain folder of photos (full-size drone images) and, optionally, a folder of truth masks
named like them. Photos decode exactly as training decodes them (PIL ``convert("RGB")``),
so the network sees the same pixels.

Errors: a folder or mask that cannot serve at all raises
:class:`segcore.data.layouts.DatasetError` (one line, naming the file and the fix); one
photo that cannot be decoded raises :class:`ImageReadError`, which a folder run reports
and skips.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from segcore.data.classes import IGNORE_INDEX, SDD_NAMES, ClassScheme
from segcore.data.layouts import DatasetError
from segcore.faults import one_line

__all__ = ["IMAGE_EXTS", "MASK_EXTS", "TRUTH_KINDS", "ImageReadError",
           "list_images", "find_truth", "image_size", "read_image", "read_truth"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
MASK_EXTS = (".png", ".tif", ".tiff", ".bmp")
# target: masks hold indices of the checkpoint's scheme; sdd: 24-class SDD label indices,
# remapped to the scheme exactly as in training.
TRUTH_KINDS = ("target", "sdd")
# Pixel modes whose values are not 8-bit colours: convert("RGB") would clip them.
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# What PIL raises for a file it cannot decode: OSError for unknown or truncated files,
# SyntaxError for some broken headers, ValueError for odd modes.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageReadError(OSError):
    """One image cannot be decoded; the folder run reports and skips it."""


def list_images(images: str | Path) -> list[Path]:
    """Image files of a folder (sorted; hidden files skipped), or a single image file.

    Raises:
        DatasetError: a missing path, an empty folder, or two images sharing a stem
            (their outputs would overwrite each other).
    """
    images = Path(images)
    if images.is_file():
        return [images]
    if not images.is_dir():
        raise DatasetError(f"images folder {images} does not exist")
    found = sorted(p for p in images.iterdir()
                   if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_EXTS)
    if not found:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTS)}) in {images}")
    stems: dict[str, list[str]] = {}
    for p in found:
        stems.setdefault(p.stem, []).append(p.name)
    dup = [v for v in stems.values() if len(v) > 1]
    if dup:
        raise DatasetError(f"images in {images} share a file stem, so their outputs would "
                           f"collide: {dup[:5]}; rename or move them")
    return found


def find_truth(truth_dir: str | Path, images: Sequence[Path]) -> dict[str, Path]:
    """Truth mask per image stem: ``<stem>.png`` (or .tif/.tiff/.bmp) in ``truth_dir``.

    Raises:
        DatasetError: the folder is missing or holds no mask for any image.
    """
    truth_dir = Path(truth_dir)
    if not truth_dir.is_dir():
        raise DatasetError(f"truth folder {truth_dir} does not exist")
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
        raise DatasetError(f"truth folder {truth_dir} has no mask named like an image "
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
    except _DECODE_ERRORS:
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
            if im.format == "PNG":
                _check_png_rows(path, w, h)
            # Same conversion as DatasetIndex.load_image, so inputs match training;
            # np.array (not asarray) gives a writable array torch can wrap.
            return np.array(im.convert("RGB"))
    except ImageReadError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageReadError(f"cannot decode ({type(e).__name__}: "
                             f"{one_line(e, 200)})") from None


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type


def _check_png_rows(path: Path, w: int, h: int) -> None:
    """A PNG whose compressed data ends early (a header that promises 6000x4000, data for
    20 rows) decodes without error, the missing rows filled with zeros: count the rows
    its data holds (decompressed in 1 MiB pieces, nothing kept) against the header's.

    Raises:
        ImageReadError: fewer rows than the header says.
    """
    import struct
    import zlib

    try:
        out, row_bytes = _png_data_rows(path, w)
    except (zlib.error, struct.error, IndexError) as e:
        raise ImageReadError(f"damaged PNG data ({type(e).__name__}: {e})") from None
    if row_bytes and out < h * row_bytes:
        raise ImageReadError(f"its data holds {out // row_bytes} of the {h} rows its header "
                             "promises (truncated or damaged)")


def _png_data_rows(path: Path, w: int) -> tuple[int, int | None]:
    """(bytes its compressed data holds, bytes per row; None: interlaced, not checked)."""
    import struct
    import zlib

    with open(path, "rb") as f:
        f.read(8)
        d = zlib.decompressobj()
        out = 0
        row_bytes = None
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            n, kind = struct.unpack(">I4s", head)
            data = f.read(n)
            f.read(4)  # CRC (PIL checked the chunks it read)
            if kind == b"IHDR":
                depth, ctype, interlace = data[8], data[9], data[12]
                if interlace:  # Adam7 passes have another size: leave it to PIL
                    return 0, None
                bits = _PNG_CHANNELS.get(ctype, 1) * depth
                row_bytes = 1 + (w * bits + 7) // 8
            elif kind == b"IDAT":
                piece = d.decompress(data, 1 << 20)
                out += len(piece)
                while d.unconsumed_tail:
                    piece = d.decompress(d.unconsumed_tail, 1 << 20)
                    out += len(piece)
            elif kind == b"IEND":
                break
        out += len(d.flush())
    return out, row_bytes


def read_truth(path: str | Path, sch: ClassScheme, kind: str = "target",
               max_pixels: int = 400_000_000) -> np.ndarray:
    """A truth mask as target indices of ``sch`` (``IGNORE_INDEX`` = 255 kept).

    Args:
        path: single-channel index mask (PNG/TIFF, mode L, P or 16-bit).
        sch: the checkpoint's class scheme.
        kind: ``target`` (values are indices of ``sch``) or ``sdd`` (24-class Semantic
            Drone Dataset labels, remapped through the scheme's table as in training).
        max_pixels: PIL's decompression-bomb limit for this read.

    Returns:
        uint8 ``(H, W)``.

    Raises:
        DatasetError: unreadable, a colour image, or values outside the scheme.
    """
    if kind not in TRUTH_KINDS:
        raise DatasetError(f"truth kind {kind!r} is not valid; choose one of "
                           f"{', '.join(TRUTH_KINDS)}")
    path = Path(path)
    try:
        with _pixel_limit(max_pixels), Image.open(path) as im:
            if im.mode not in ("L", "P", "1", *_HIGH_DEPTH_MODES):
                raise DatasetError(f"truth mask {path} is a {im.mode} image; give index masks "
                                   "(one class value per pixel, mode L or P)")
            arr = np.asarray(im)
    except DatasetError:
        raise
    except _DECODE_ERRORS as e:
        raise DatasetError(f"truth mask {path} cannot be read ({type(e).__name__}: "
                           f"{one_line(e, 200)})") from None
    arr = arr.astype(np.int64, copy=False)
    n = len(SDD_NAMES) if kind == "sdd" else sch.num_classes
    bad = np.unique(arr[((arr < 0) | (arr >= n)) & (arr != IGNORE_INDEX)])
    if bad.size:
        hint = ("; if the masks hold 24-class SDD labels, pass --truth-kind sdd"
                if kind == "target" and bad.max() < len(SDD_NAMES) else "")
        raise DatasetError(f"truth mask {path} holds value(s) {bad[:10].tolist()} outside the "
                           f"{'SDD labels' if kind == 'sdd' else repr(sch.name) + ' scheme'} "
                           f"(0-{n - 1}, {IGNORE_INDEX} = ignored){hint}")
    arr = arr.astype(np.uint8)
    if kind == "sdd":
        lut = sch.lut.copy()
        lut[IGNORE_INDEX] = IGNORE_INDEX  # ignored stays ignored (values checked above)
        arr = lut[arr]
    return arr
