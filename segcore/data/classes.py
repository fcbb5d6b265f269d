"""Class tables of the Semantic Drone Dataset and the three class schemes.

The dataset labels 24 classes (index 0-23). The suite trains on one of three schemes:

- ``full``: all 24 classes, unchanged.
- ``six``: the reference study's surface classes ``unlabeled, paved-area, dirt, grass,
  roof, water``; the other 18 classes fold into them through :data:`SIX_CLASS_MAP`
  (documented below, overridable with ``scheme(..., overrides={...})``).
- ``binary``: ``rest`` (0) vs ``paved-area`` (1).

Remapping is a 256-entry lookup table applied to whole arrays (``lut[mask]``), never a
per-pixel Python loop. Values outside the source table map to :data:`IGNORE_INDEX` (255) so a
caller can detect them with one comparison.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

IGNORE_INDEX = 255

# (name, (r, g, b)) in label-index order, as in the dataset's class_dict_seg.csv.
SDD_CLASSES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("unlabeled", (0, 0, 0)),
    ("paved-area", (128, 64, 128)),
    ("dirt", (130, 76, 0)),
    ("grass", (0, 102, 0)),
    ("gravel", (112, 103, 87)),
    ("water", (28, 42, 168)),
    ("rocks", (48, 41, 30)),
    ("pool", (0, 50, 89)),
    ("vegetation", (107, 142, 35)),
    ("roof", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("window", (254, 228, 12)),
    ("door", (254, 148, 12)),
    ("fence", (190, 153, 153)),
    ("fence-pole", (153, 153, 153)),
    ("person", (255, 22, 96)),
    ("dog", (102, 51, 0)),
    ("car", (9, 143, 150)),
    ("bicycle", (119, 11, 32)),
    ("tree", (51, 51, 0)),
    ("bald-tree", (190, 250, 190)),
    ("ar-marker", (112, 150, 146)),
    ("obstacle", (2, 135, 115)),
    ("conflicting", (255, 0, 0)),
)
SDD_NAMES: tuple[str, ...] = tuple(n for n, _ in SDD_CLASSES)

SIX_NAMES: tuple[str, ...] = ("unlabeled", "paved-area", "dirt", "grass", "roof", "water")

# Why each of the 18 other classes lands where it does (the surface a raindrop meets):
#   gravel, rocks            -> dirt      loose mineral ground, partly pervious
#   pool                     -> water     open water surface
#   vegetation, tree,
#   bald-tree                -> grass     vegetated, pervious ground cover
#   wall, window, door       -> roof      parts of buildings: impervious built structure
#   car, bicycle, ar-marker  -> paved-area  they stand on roads, lots and paths
#   fence, fence-pole,
#   person, dog, obstacle,
#   conflicting              -> unlabeled  thin or moving objects: the ground under them
#                                          is unknown
SIX_CLASS_MAP: dict[str, str] = {
    "unlabeled": "unlabeled",
    "paved-area": "paved-area",
    "dirt": "dirt",
    "grass": "grass",
    "gravel": "dirt",
    "water": "water",
    "rocks": "dirt",
    "pool": "water",
    "vegetation": "grass",
    "roof": "roof",
    "wall": "roof",
    "window": "roof",
    "door": "roof",
    "fence": "unlabeled",
    "fence-pole": "unlabeled",
    "person": "unlabeled",
    "dog": "unlabeled",
    "car": "paved-area",
    "bicycle": "paved-area",
    "tree": "grass",
    "bald-tree": "grass",
    "ar-marker": "paved-area",
    "obstacle": "unlabeled",
    "conflicting": "unlabeled",
}

SCHEMES = ("binary", "six", "full")


@dataclass(frozen=True)
class ClassScheme:
    """A target class set and how source (24-class) labels map onto it.

    Attributes:
        name: ``binary``, ``six`` or ``full``.
        names: target class names in index order.
        colors: RGB colour per target class (for colour maps and overlays).
        lut: uint8 array of 256 entries mapping a source label index to a target index
            (``IGNORE_INDEX`` for values outside the source table).
    """

    name: str
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    lut: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def is_binary(self) -> bool:
        return self.name == "binary"

    def remap(self, mask: np.ndarray) -> np.ndarray:
        """Map a source-index mask (any integer dtype) to target indices with one lookup."""
        if mask.dtype != np.uint8:
            # Values above 255 cannot be valid source labels.
            mask = np.where((mask < 0) | (mask > 255), IGNORE_INDEX, mask).astype(np.uint8)
        return self.lut[mask]

    def colorize(self, target: np.ndarray) -> np.ndarray:
        """Target-index map (H, W) -> RGB uint8 image (H, W, 3)."""
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[: self.num_classes] = np.asarray(self.colors, dtype=np.uint8)
        return palette[target]


def scheme(name: str, overrides: Mapping[str, str] | None = None,
           source: Sequence[str] = SDD_NAMES) -> ClassScheme:
    """Build a class scheme by name.

    Args:
        name: one of ``binary``, ``six``, ``full``.
        overrides: for ``six``, ``{source_class: target_class}`` entries replacing those of
            :data:`SIX_CLASS_MAP` (for example ``{"tree": "unlabeled"}``).
        source: the source class names in label-index order (the dataset's table).

    Raises:
        ValueError: unknown scheme, or an override naming an unknown class.
    """
    if name not in SCHEMES:
        raise ValueError(f"class scheme {name!r} is unknown; choose one of {', '.join(SCHEMES)}")
    src_colors = dict(SDD_CLASSES)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    if name == "full":
        names = tuple(source)
        colors = tuple(src_colors.get(n, (0, 0, 0)) for n in names)
        lut[: len(names)] = np.arange(len(names), dtype=np.uint8)
        return ClassScheme(name, names, colors, lut)
    if name == "six":
        mapping = dict(SIX_CLASS_MAP)
        for k, v in (overrides or {}).items():
            if k not in mapping:
                raise ValueError(f"six-class override names unknown source class {k!r}; "
                                 f"known: {', '.join(SDD_NAMES)}")
            if v not in SIX_NAMES:
                raise ValueError(f"six-class override maps {k!r} to {v!r}; "
                                 f"targets are {', '.join(SIX_NAMES)}")
            mapping[k] = v
        names = SIX_NAMES
        for i, n in enumerate(source):
            lut[i] = names.index(mapping.get(n, "unlabeled"))
        colors = tuple(src_colors[n] for n in names)
        return ClassScheme(name, names, colors, lut)
    # binary: paved-area (1) vs everything else (0)
    names = ("rest", "paved-area")
    for i, n in enumerate(source):
        lut[i] = 1 if n == "paved-area" else 0
    colors = ((0, 0, 0), src_colors["paved-area"])
    return ClassScheme(name, names, colors, lut)


def class_csv_text(classes=SDD_CLASSES) -> str:
    """A ``class_dict_seg.csv`` in the dataset's own format (a space after commas)."""
    lines = ["name, r, g, b"] + [f"{n}, {r}, {g}, {b}" for n, (r, g, b) in classes]
    return "\n".join(lines) + "\n"


def write_class_csv(path: str | Path, classes=SDD_CLASSES) -> None:
    """Write :func:`class_csv_text` to ``path``."""
    Path(path).write_text(class_csv_text(classes))


def read_class_csv(path: str | Path) -> tuple[tuple[str, tuple[int, int, int]], ...]:
    """Read a class table CSV (``name,r,g,b`` with or without spaces after commas).

    Raises:
        ValueError: a missing column or a non-integer colour, naming the file and line.
    """
    path = Path(path)
    rows = []
    with path.open(newline="") as f:
        reader = csv.reader(f, skipinitialspace=True)
        header = [h.strip().lower() for h in next(reader, [])]
        if header[:4] != ["name", "r", "g", "b"]:
            raise ValueError(f"{path}: expected header 'name, r, g, b', found {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            try:
                name, r, g, b = (c.strip() for c in row[:4])
                rows.append((name, (int(r), int(g), int(b))))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: cannot read class row {row}: {e}") from None
    return tuple(rows)
