"""Class tables of the Semantic Drone Dataset and the class schemes built on them.

The dataset labels 24 classes (index 0-23). The suite trains on one of these schemes:

- ``full``: all 24 classes, unchanged.
- ``six``: the reference study's surface classes ``unlabeled, paved-area, dirt, grass,
  roof, water``; the other 18 classes fold into them through :data:`SIX_CLASS_MAP`
  (documented below, overridable with ``scheme(..., overrides={...})``).
- ``binary``: ``rest`` (0) vs ``paved-area`` (1).
- ``map``: a fold read from a TOML file (:func:`load_class_map`; the format is below and
  examples are in ``configs/classmaps/``), such as the study's five classes.
- ``unlabeled-binary``: the study's section 5.1, targets made *without semantics* from the
  label image (see below).

Remapping is a 256-entry lookup table applied to whole arrays (``lut[mask]``), never a
per-pixel Python loop. Values outside the source table map to :data:`IGNORE_INDEX` (255) so a
caller can detect them with one comparison.

Unlabeled binary
----------------
The study asked whether a U-Net learns a split of the picture that carries no meaning. Its
targets: the label image converted to grayscale, standardized per image
(``z = (g - mean) / std`` over the image), and thresholded. Its text thresholds at the mean
(``z > 0``); its code at ``z > 0.5``, our default (``threshold``, set with
``data.unlabeled_threshold``). Here ``g`` is the grayscale of the label image as the
colour masks are drawn: the ITU-R 601 luma of each class colour, rounded as PIL's
``convert("L")`` and OpenCV's ``cvtColor`` round it (:func:`gray_table`). So class 1
(``bright``) is every pixel whose class colour is lighter than ``threshold`` standard
deviations above the image's mean gray, class 0 (``dark``) the rest. The rule is a
function of the whole image, not of the label alone, so it is no fixed lookup table: per
image, the mean and standard deviation come from the 256-bin label histogram and the
decision per label becomes that image's lookup table (:func:`unlabeled_binary_targets`),
still one vectorised pass. A uniform image (``std = 0``) has ``z = 0`` everywhere.
Pixels whose label is not in the class table are ignored and do not enter the statistics.

Its predictions were thresholded at the median (or the mean) of each output image rather
than at p = 0.5, so both classes get an equal share: :meth:`ClassScheme.predict` with
``pred_threshold`` ``median`` or ``mean`` (``fixed`` is p > 0.5) does that for any binary
scheme.

Class-map files
---------------
::

    name = "study-5"                 # optional; default: the file's stem
    description = "free text"        # optional
    [[classes]]                      # the target classes, in index order
    name = "unlabeled"
    color = [0, 0, 0]
    sources = ["unlabeled", "fence", "water", ...]   # SDD classes folded into it

Every one of the 24 source classes must appear in exactly one ``sources`` list; names and
colours are required; a mistake is a :class:`ClassMapError` naming the file and the class.
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

# The schemes defined by class names (each a fixed lookup table); flood properties and
# other semantic tables exist for these.
SCHEMES = ("binary", "six", "full")
UNLABELED_BINARY = "unlabeled-binary"
MAP = "map"  # a class-map file (data.class_map)
ALL_SCHEMES = SCHEMES + (UNLABELED_BINARY, MAP)
BINARY_SCHEMES = ("binary", UNLABELED_BINARY)  # one output channel, sigmoid
UNLABELED_NAMES = ("dark", "bright")
PRED_THRESHOLDS = ("fixed", "median", "mean")
DEFAULT_UNLABELED_THRESHOLD = 0.5  # the study's code: standardized gray > 0.5


class ClassMapError(ValueError):
    """A class-map file is missing or wrong; the message names the file and the class."""


@dataclass(frozen=True)
class ClassScheme:
    """A target class set and how source (24-class) labels map onto it.

    Attributes:
        name: ``binary``, ``six``, ``full``, ``unlabeled-binary``, or a class map's name.
        names: target class names in index order.
        colors: RGB colour per target class (for colour maps and overlays).
        lut: uint8 array of 256 entries mapping a source label index to a target index
            (``IGNORE_INDEX`` for values outside the source table); ``None`` for
            ``unlabeled-binary``, whose targets depend on the whole image (use
            :meth:`remap`).
        threshold: ``unlabeled-binary`` only: the standardized-gray cut (see the module
            docstring).
        pred_threshold: how a binary model's output becomes classes (:meth:`predict`):
            ``fixed`` (p > 0.5), ``median`` or ``mean`` of each output image.
        class_map: the class-map file a ``map`` scheme was read from.
    """

    name: str
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    lut: np.ndarray | None
    threshold: float | None = None
    pred_threshold: str = "fixed"
    class_map: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def is_binary(self) -> bool:
        """One output channel with a sigmoid (the binary schemes; a two-class map is a
        two-channel softmax model like any other map)."""
        return self.name in BINARY_SCHEMES

    @property
    def per_image(self) -> bool:
        """Targets depend on the whole label image, not on each label alone."""
        return self.lut is None

    def remap(self, mask: np.ndarray, classes=SDD_CLASSES) -> np.ndarray:
        """Map a source-index mask (any integer dtype) to target indices in one pass.

        Args:
            mask: label indices of ``classes``.
            classes: the source class table (its colours give ``unlabeled-binary`` its
                grayscale); the lookup-table schemes are defined over the SDD table.
        """
        if mask.dtype != np.uint8:
            # Values above 255 cannot be valid source labels.
            mask = np.where((mask < 0) | (mask > 255), IGNORE_INDEX, mask).astype(np.uint8)
        if self.lut is None:
            return unlabeled_binary_targets(mask, gray_table(classes), self.threshold)
        return self.lut[mask]

    def colorize(self, target: np.ndarray) -> np.ndarray:
        """Target-index map (H, W) -> RGB uint8 image (H, W, 3)."""
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[: self.num_classes] = np.asarray(self.colors, dtype=np.uint8)
        return palette[target]

    def predict(self, logits):
        """Class indices of raw outputs under this scheme's ``pred_threshold``.

        Call it wherever logits become classes for metrics and figures (in place of
        ``segcore.metrics.logits_to_pred``, which it uses for ``fixed``).

        Args:
            logits: torch [N, C, H, W] raw outputs; C == 1 for a binary scheme.

        Returns:
            int64 [N, H, W].
        """
        return binary_predictions(logits, self.pred_threshold)


def binary_predictions(logits, rule: str = "fixed"):
    """Classes of [N, C, H, W] outputs; for one channel, thresholded per ``rule``.

    ``fixed``: p > 0.5 (and argmax for C > 1), as :func:`segcore.metrics.logits_to_pred`.
    ``median``: class 1 where the logit is above the median of its own image (the lower
    median, so at most half of the pixels: both classes get an equal share when the
    outputs are distinct). ``mean``: class 1 where the sigmoid probability is above its
    image's mean probability. The study used these for its unlabeled-binary predictions.

    Raises:
        ValueError: an unknown rule, or ``median``/``mean`` on a multi-channel output.
    """
    from segcore.metrics import logits_to_pred

    if rule not in PRED_THRESHOLDS:
        raise ValueError(f"prediction threshold {rule!r} is unknown; choose one of "
                         f"{', '.join(PRED_THRESHOLDS)}")
    if rule == "fixed":
        return logits_to_pred(logits)
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"prediction threshold {rule!r} needs one-channel [N, 1, H, W] "
                         f"outputs of a binary scheme, got shape {tuple(logits.shape)}")
    x = logits[:, 0]
    if rule == "median":
        # median, not quantile: quantile refuses inputs above 16 M elements.
        cut = x.flatten(1).median(dim=1).values
    else:
        x = x.sigmoid()
        cut = x.flatten(1).mean(dim=1)
    return (x > cut.view(-1, 1, 1)).long()


def gray_table(classes=SDD_CLASSES) -> np.ndarray:
    """Grayscale of each class colour, as a grayscale conversion of the colour mask gives
    it: ITU-R 601 luma with PIL's integer rounding (OpenCV's agrees). float64, 256 entries,
    NaN beyond the table (unknown labels)."""
    rgb = np.array([c for _, c in classes], dtype=np.int64).reshape(-1, 3)
    luma = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16
    table = np.full(256, np.nan)
    table[:len(luma)] = luma
    return table


def unlabeled_binary_targets(labels: np.ndarray, gray: np.ndarray,
                             threshold: float = DEFAULT_UNLABELED_THRESHOLD) -> np.ndarray:
    """The study's unlabeled-binary targets of one label image (see the module docstring).

    Args:
        labels: uint8 (H, W) label indices.
        gray: :func:`gray_table` of the class table the labels index.
        threshold: class 1 where the standardized gray is above it (0.5: the study's
            code; 0: at the mean, its text).

    Returns:
        uint8 (H, W): 0, 1, or ``IGNORE_INDEX`` where the label has no gray value.
    """
    counts = np.bincount(labels.ravel(), minlength=256).astype(np.float64)
    known = ~np.isnan(gray)
    n = counts[known].sum()
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    if n == 0:
        return lut[labels]
    g = gray[known]
    mean = (counts[known] * g).sum() / n
    std = np.sqrt((counts[known] * (g - mean) ** 2).sum() / n)
    z = (g - mean) / std if std > 0 else np.zeros_like(g)
    lut[known] = (z > threshold).astype(np.uint8)
    return lut[labels]


def scheme(name: str, overrides: Mapping[str, str] | None = None,
           source: Sequence[str] = SDD_NAMES, threshold: float | None = None,
           pred_threshold: str = "fixed", class_map: str | Path | None = None) -> ClassScheme:
    """Build a class scheme by name.

    Args:
        name: one of :data:`ALL_SCHEMES`.
        overrides: for ``six``, ``{source_class: target_class}`` entries replacing those of
            :data:`SIX_CLASS_MAP` (for example ``{"tree": "unlabeled"}``).
        source: the source class names in label-index order (the dataset's table).
        threshold: ``unlabeled-binary``: the standardized-gray cut (default 0.5, the
            study's code).
        pred_threshold: ``fixed``, ``median`` or ``mean`` (binary schemes; see
            :meth:`ClassScheme.predict`).
        class_map: ``map``: the TOML file (see :func:`load_class_map`).

    Raises:
        ValueError: unknown scheme, an override naming an unknown class, a prediction
            threshold on a multi-class scheme; :class:`ClassMapError` for a bad map file.
    """
    if name not in ALL_SCHEMES:
        raise ValueError(f"class scheme {name!r} is unknown; choose one of "
                         f"{', '.join(ALL_SCHEMES)}")
    if pred_threshold != "fixed" and name not in BINARY_SCHEMES:
        raise ValueError(f"prediction threshold {pred_threshold!r} applies to the binary "
                         f"schemes ({', '.join(BINARY_SCHEMES)}), not to {name!r}")
    if pred_threshold not in PRED_THRESHOLDS:
        raise ValueError(f"prediction threshold {pred_threshold!r} is unknown; choose one "
                         f"of {', '.join(PRED_THRESHOLDS)}")
    if (name == MAP) != (class_map is not None):
        raise ValueError("class scheme 'map' is read from a class-map file: pass class_map "
                         "(--class-map FILE.toml), and only with it")
    src_colors = dict(SDD_CLASSES)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    if name == MAP:
        return load_class_map(class_map, source)
    if name == UNLABELED_BINARY:
        t = DEFAULT_UNLABELED_THRESHOLD if threshold is None else float(threshold)
        if not np.isfinite(t):
            raise ValueError(f"unlabeled-binary threshold {threshold!r} must be a finite "
                             "number of standard deviations, e.g. 0.5 or 0")
        return ClassScheme(name, UNLABELED_NAMES, ((0, 0, 0), (255, 255, 255)), None, t,
                           pred_threshold)
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
    return ClassScheme(name, names, colors, lut, pred_threshold=pred_threshold)


def scheme_for(data) -> ClassScheme:
    """The scheme a :class:`~segcore.config.DataConfig` asks for (scheme name, class-map
    file, unlabeled-binary threshold, prediction threshold): what every caller that turns
    a configuration into a scheme should use."""
    return scheme(data.class_scheme, threshold=data.unlabeled_threshold,
                  pred_threshold=data.pred_threshold, class_map=data.class_map)


_MAP_KEYS = {"name", "description", "classes"}
_MAP_CLASS_KEYS = {"name", "color", "sources"}


def load_class_map(path: str | Path, source: Sequence[str] = SDD_NAMES) -> ClassScheme:
    """Read and validate a class-map file (format in the module docstring).

    Args:
        path: the TOML file.
        source: the source class names in label-index order (the SDD table).

    Returns:
        A ``map`` scheme: ``name`` from the file, ``lut`` from the ``sources`` lists.

    Raises:
        ClassMapError: missing file, bad TOML, a missing or ill-typed name or colour, a
            source class mapped twice, not at all, or unknown; one line naming the file.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(path)

    def fail(msg: str) -> ClassMapError:
        return ClassMapError(f"class map {path}: {msg}")

    if not path.is_file():
        raise fail("no such file; pass a TOML file such as configs/classmaps/study-5.toml")
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise fail(f"not valid TOML ({' '.join(str(e).split())})") from None
    unknown = set(doc) - _MAP_KEYS
    if unknown:
        raise fail(f"unknown key(s) {', '.join(sorted(unknown))}; known: "
                   f"{', '.join(sorted(_MAP_KEYS))}")
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise fail(f"name = {name!r} must be a non-empty string")
    if name in ALL_SCHEMES:
        raise fail(f"name = {name!r} is a built-in scheme's name; choose another so rows "
                   "tell them apart")
    entries = doc.get("classes")
    if not isinstance(entries, list) or not 2 <= len(entries) <= 255 or \
            not all(isinstance(e, dict) for e in entries):
        raise fail("needs 2 to 255 [[classes]] tables, each with name, color and sources")
    names: list[str] = []
    colors: list[tuple[int, int, int]] = []
    target_of: dict[str, int] = {}
    for i, e in enumerate(entries):
        cname = e.get("name")
        where = f"class {cname!r}" if isinstance(cname, str) else f"class #{i + 1}"
        extra = set(e) - _MAP_CLASS_KEYS
        if extra:
            raise fail(f"{where}: unknown key(s) {', '.join(sorted(extra))}; give name, "
                       "color and sources")
        if not isinstance(cname, str) or not cname.strip():
            raise fail(f"{where}: needs name = \"...\" (a non-empty string)")
        if cname in names:
            raise fail(f"{where} is listed twice; give each target class once")
        color = e.get("color")
        if not (isinstance(color, list) and len(color) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                for v in color)):
            raise fail(f"{where}: color = {color!r} must be [r, g, b] with integers 0-255")
        srcs = e.get("sources")
        if not isinstance(srcs, list) or not srcs or \
                not all(isinstance(v, str) for v in srcs):
            raise fail(f"{where}: sources must be a non-empty list of source class names")
        for src in srcs:
            if src not in source:
                raise fail(f"{where}: source class {src!r} is not a Semantic Drone Dataset "
                           f"class; known: {', '.join(source)}")
            if src in target_of:
                first = names[target_of[src]] if target_of[src] < len(names) else cname
                raise fail(f"source class {src!r} is mapped twice (in {first!r} and "
                           f"{cname!r}); map each source class exactly once")
            target_of[src] = i
        names.append(cname)
        colors.append(tuple(color))
    missing = [s for s in source if s not in target_of]
    if missing:
        raise fail(f"source class(es) {', '.join(map(repr, missing))} are not mapped; add "
                   "each to one class's sources")
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for i, s in enumerate(source):
        lut[i] = target_of[s]
    return ClassScheme(name, tuple(names), tuple(colors), lut, class_map=str(path))


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
