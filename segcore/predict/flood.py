"""Class map -> impervious fraction and composite runoff coefficient (Rational Method).

The Rational Method estimates the peak runoff of a small catchment as ``Q = C i A``
(``C`` dimensionless runoff coefficient, ``i`` rainfall intensity, ``A`` area). For a
catchment made of surfaces ``k`` with areas ``A_k`` the composite coefficient is the
area-weighted mean ``C = sum(A_k C_k) / sum(A_k)``. Here the areas come from a
segmentation map: every class carries a *surface* kind and a coefficient range, and
pixel counts stand in for areas. That holds for nadir images at constant altitude
(constant ground sampling distance); oblique views over-weight nearby ground.

Surface kinds
-------------
``impervious`` (paved, roofs), ``pervious`` (vegetation, soil, gravel), ``water`` and
``unknown``. Impervious, pervious and water fractions are reported over the *classified*
(known) pixels, so they add up to 1.

Rules for water and unknown pixels
----------------------------------
* **Water** (``water``, ``pool``): ``C = 1.0`` (low = typical = high). Rain falling on a
  free water surface meets no infiltration, interception or depression storage, so all
  of it joins the water body at once; open water is the usual ``C = 1`` case of the
  method (and curve number 98-100 in NRCS TR-55). Water stays in the composite ``C``
  (its area receives rain) and is reported on its own as ``water_fraction``, because
  whether that water reaches a drain (a stream) or is stored (a pond or swimming pool
  with freeboard) cannot be told from an image. Where it is storage, override its ``c``
  (down to 0) or mark it ``surface = "unknown"`` in a TOML file.
* **Unknown** (``unlabeled``, ignored pixels (``ignore_index``), and classes whose
  ground is hidden: fence, fence-pole, person, dog, obstacle, conflicting): no
  coefficient. They are counted and reported as ``unknown_fraction`` (share of all
  pixels) and left out of every denominator of the composite ``C`` and of the surface
  fractions: ``C`` is the coefficient of the classified area. They are never folded into
  a surface class, so a map that is 40 % unknown says so instead of quietly lowering or
  raising ``C``.

Default coefficients (low, typical, high)
-----------------------------------------
Ranges are those of the standard Rational-Method tables: the ASCE/WPCF table of ASCE
Manual of Practice No. 37 (ASCE & WEF 1992, "Design and Construction of Urban Stormwater
Management Systems"; also FHWA HEC-22 Table 3-1), and its widely reproduced form with
agricultural land (for example California SWRCB Clean Water Team, Guidance Compendium
Fact Sheet 5.1.3, 2011):

=====================  ==================  ===========================================
class (full scheme)    C low/typ/high      source / reasoning
=====================  ==================  ===========================================
paved-area             0.70 / 0.85 / 0.95  streets: asphalt 0.70-0.95, concrete
                                           0.80-0.95, drives and walks 0.75-0.85;
                                           typical between the asphalt (0.825) and
                                           concrete (0.875) midpoints
roof                   0.75 / 0.85 / 0.95  roofs 0.75-0.95
wall, window, door     0.75 / 0.85 / 0.95  parts of buildings: the roof's footprint
car, bicycle,          0.70 / 0.85 / 0.95  stand on paved ground (as in the six-class
ar-marker                                  fold of :mod:`segcore.data.classes`)
grass                  0.05 / 0.20 / 0.35  lawns 0.05-0.35 (sandy flat .. heavy soil
                                           steep); typical = heavy soil, 2-7 % slope
dirt                   0.20 / 0.40 / 0.60  bare packed soil, rough 0.20-0.50, smooth
                                           0.30-0.60
gravel                 0.35 / 0.50 / 0.70  gravel or macadam surfaces, 0.35-0.70 in
                                           older sewer-design tables (not in the ASCE
                                           table; compacted gravel sits high);
                                           typical 0.50, loose rather than compacted
rocks                  0.20 / 0.45 / 0.70  suite judgment: loose stone over soil, the
                                           span of bare soil and gravel
vegetation, tree,      0.05 / 0.15 / 0.25  woodlands 0.05-0.25 (canopy over pervious
bald-tree                                  ground)
water, pool            1.00 / 1.00 / 1.00  see the water rule above
unlabeled, fence,      none (unknown)      ground under them unknown
fence-pole, person,
dog, obstacle,
conflicting
=====================  ==================  ===========================================

Chow, Maidment & Mays, "Applied Hydrology" (1988), Table 15.1.1, gives the same surfaces
as functions of the design return period (2-500 years); rarer storms give higher ``C``.
The ``high`` column is the bound to use for long return periods, ``low`` for short ones
on permeable, flat ground. Unless stated, ``typical`` is the midpoint of the range. Local
drainage manuals often prescribe their own values; load them with a TOML override.

``six`` scheme (classes folded as in :data:`segcore.data.classes.SIX_CLASS_MAP`):
unlabeled unknown; paved-area 0.70/0.85/0.95; dirt (dirt, gravel, rocks) 0.20/0.45/0.70;
grass (grass, vegetation, trees) 0.05/0.20/0.35; roof (roof, wall, window, door)
0.75/0.85/0.95; water (water, pool) 1.0.

``binary`` scheme: paved-area impervious 0.70/0.85/0.95; ``rest`` is a *mixed* class
(vegetation, soil, roofs, water and unlabeled ground together) recorded as ``pervious``
with the wide range 0.05/0.30/1.00: from all woodland to all roof or water; typical 0.30
is a suite judgment for suburban scenes that are mostly vegetation with some roofs.
Under ``binary`` the impervious fraction counts paved area only (roofs are in ``rest``)
and there is no unknown share, so both numbers are coarse; prefer ``six`` or ``full``.

Override any entry with a TOML file (see :func:`load_properties`)::

    [classes.grass]
    surface = "pervious"
    c = [0.10, 0.20, 0.35]
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from segcore.config import ConfigError
from segcore.data.classes import SCHEMES, SDD_NAMES, SIX_NAMES

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "SURFACES",
    "PropertyError",
    "SurfaceProperty",
    "PropertyTable",
    "default_properties",
    "load_properties",
    "surface_stats",
    "aggregate",
    "peak_flow",
]

SURFACES = ("pervious", "impervious", "water", "unknown")
_CLASSIFIED = ("impervious", "pervious", "water")


class PropertyError(ConfigError):
    """A surface-property table (or a TOML override) is invalid."""


@dataclass(frozen=True)
class SurfaceProperty:
    """Surface kind and Rational-Method runoff coefficient range of one class.

    Attributes:
        surface: one of :data:`SURFACES`.
        c: ``(low, typical, high)`` in [0, 1], ordered; ``None`` for ``unknown``.
    """

    surface: str
    c: tuple[float, float, float] | None


_PAVED = (0.70, 0.85, 0.95)
_BUILDING = (0.75, 0.85, 0.95)
_LAWN = (0.05, 0.20, 0.35)
_WOOD = (0.05, 0.15, 0.25)
_WATER = (1.0, 1.0, 1.0)


def _imp(c):
    return SurfaceProperty("impervious", c)


def _perv(c):
    return SurfaceProperty("pervious", c)


_UNKNOWN = SurfaceProperty("unknown", None)
_WATER_P = SurfaceProperty("water", _WATER)

# The tables in the module docstring; keep them in sync.
_DEFAULTS: dict[str, dict[str, SurfaceProperty]] = {
    "full": {
        "unlabeled": _UNKNOWN,
        "paved-area": _imp(_PAVED),
        "dirt": _perv((0.20, 0.40, 0.60)),
        "grass": _perv(_LAWN),
        "gravel": _perv((0.35, 0.50, 0.70)),
        "water": _WATER_P,
        "rocks": _perv((0.20, 0.45, 0.70)),
        "pool": _WATER_P,
        "vegetation": _perv(_WOOD),
        "roof": _imp(_BUILDING),
        "wall": _imp(_BUILDING),
        "window": _imp(_BUILDING),
        "door": _imp(_BUILDING),
        "fence": _UNKNOWN,
        "fence-pole": _UNKNOWN,
        "person": _UNKNOWN,
        "dog": _UNKNOWN,
        "car": _imp(_PAVED),
        "bicycle": _imp(_PAVED),
        "tree": _perv(_WOOD),
        "bald-tree": _perv(_WOOD),
        "ar-marker": _imp(_PAVED),
        "obstacle": _UNKNOWN,
        "conflicting": _UNKNOWN,
    },
    "six": {
        "unlabeled": _UNKNOWN,
        "paved-area": _imp(_PAVED),
        "dirt": _perv((0.20, 0.45, 0.70)),
        "grass": _perv(_LAWN),
        "roof": _imp(_BUILDING),
        "water": _WATER_P,
    },
    "binary": {
        "rest": _perv((0.05, 0.30, 1.00)),
        "paved-area": _imp(_PAVED),
    },
}
_SCHEME_NAMES = {"full": SDD_NAMES, "six": SIX_NAMES, "binary": ("rest", "paved-area")}


@dataclass(frozen=True)
class PropertyTable:
    """Surface properties of every class of a scheme.

    Attributes:
        scheme: ``full``, ``six`` or ``binary``.
        names: class names in index order.
        props: ``{class name: SurfaceProperty}`` (read-only).
        source: ``"defaults"`` or the override file that was applied.
    """

    scheme: str
    names: tuple[str, ...]
    props: Mapping[str, SurfaceProperty]
    source: str = "defaults"

    def __getitem__(self, name: str) -> SurfaceProperty:
        return self.props[name]

    def __contains__(self, name: object) -> bool:
        return name in self.props

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain ``{name: {"surface": ..., "c": [l, t, h] or None}}`` (JSON-friendly)."""
        return {n: {"surface": p.surface, "c": None if p.c is None else list(p.c)}
                for n, p in self.props.items()}


def _scheme_check(scheme_name: str) -> None:
    if scheme_name not in SCHEMES:
        raise PropertyError(f"class scheme {scheme_name!r} is unknown; "
                            f"choose one of {', '.join(SCHEMES)}")


def default_properties(scheme_name: str) -> PropertyTable:
    """The documented default table of a scheme.

    Args:
        scheme_name: ``full``, ``six`` or ``binary``.

    Returns:
        A :class:`PropertyTable` with an entry for every class of the scheme.
    """
    _scheme_check(scheme_name)
    names = tuple(_SCHEME_NAMES[scheme_name])
    props = {n: _DEFAULTS[scheme_name][n] for n in names}
    return PropertyTable(scheme_name, names, types.MappingProxyType(props))


def _check_c(where: str, value: Any) -> tuple[float, float, float]:
    allowed = "c must be 3 numbers [low, typical, high] in [0, 1] with low <= typical <= high"
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise PropertyError(f"{where}: c = {value!r} is not valid; {allowed}")
    lo, typ, hi = (float(v) for v in value)
    if not all(0.0 <= v <= 1.0 for v in (lo, typ, hi)):
        raise PropertyError(f"{where}: c = {value!r} has a value outside [0, 1]; {allowed}")
    if not lo <= typ <= hi:
        raise PropertyError(f"{where}: c = {value!r} is not ordered; {allowed}")
    return lo, typ, hi


def load_properties(path: str | Path | None, scheme_name: str) -> PropertyTable:
    """Default properties of a scheme, overridden by a TOML file.

    The file has one ``[classes.<name>]`` table per overridden class with ``surface``
    and/or ``c = [low, typical, high]``; keys not given keep their default. An optional
    top-level ``scheme = "..."`` must match ``scheme_name``.

    Args:
        path: TOML file, or ``None`` for the defaults.
        scheme_name: ``full``, ``six`` or ``binary``.

    Returns:
        The merged :class:`PropertyTable`.

    Raises:
        PropertyError: unreadable TOML, unknown key or class name, bad surface or bad
            ``c``; the message names the file, the class and what is allowed.
    """
    table = default_properties(scheme_name)
    if path is None:
        return table
    path = Path(path)
    if not path.is_file():
        raise PropertyError(f"surface property file {path} does not exist")
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PropertyError(f"{path}: not valid TOML: {e}") from None

    extra = set(doc) - {"classes", "scheme"}
    if extra:
        raise PropertyError(f"{path}: unknown top-level key(s) {sorted(extra)}; "
                            "allowed: 'classes' (tables [classes.<name>]) and 'scheme'")
    if "scheme" in doc and doc["scheme"] != scheme_name:
        raise PropertyError(f"{path}: scheme = {doc['scheme']!r} but the run uses the "
                            f"{scheme_name!r} class scheme")
    classes = doc.get("classes", {})
    if not isinstance(classes, dict):
        raise PropertyError(f"{path}: 'classes' must be tables like [classes.grass]")

    props = dict(table.props)
    for name, entry in classes.items():
        where = f"{path}: [classes.{name}]"
        if name not in props:
            raise PropertyError(f"{where}: unknown class {name!r} for the {scheme_name!r} "
                                f"scheme; classes are: {', '.join(table.names)}")
        if not isinstance(entry, dict):
            raise PropertyError(f"{where}: must be a table with 'surface' and/or 'c'")
        bad = set(entry) - {"surface", "c"}
        if bad:
            raise PropertyError(f"{where}: unknown key(s) {sorted(bad)}; "
                                "allowed: 'surface', 'c'")
        old = props[name]
        surface = entry.get("surface", old.surface)
        if surface not in SURFACES:
            raise PropertyError(f"{where}: surface = {surface!r} is not valid; "
                                f"choose one of: {', '.join(SURFACES)}")
        if surface == "unknown":
            if "c" in entry:
                raise PropertyError(f"{where}: surface 'unknown' takes no c (unknown "
                                    "pixels are excluded from the composite C); remove c "
                                    "or choose a surface among "
                                    f"{', '.join(_CLASSIFIED)}")
            c = None
        elif "c" in entry:
            c = _check_c(where, entry["c"])
        elif old.c is None:
            raise PropertyError(f"{where}: surface {surface!r} needs c = [low, typical, "
                                "high] (the default entry is unknown and has none)")
        else:
            c = old.c
        props[name] = SurfaceProperty(surface, c)
    return PropertyTable(scheme_name, table.names, types.MappingProxyType(props),
                         source=str(path))


# ----------------------------------------------------------------------------- stats


def _counts(class_map: Any, n: int, ignore_index: int | None) -> tuple[np.ndarray, int]:
    """Per-class pixel counts (int64, length n) and the number of ignored pixels."""
    if hasattr(class_map, "detach"):  # torch.Tensor without importing torch here
        class_map = class_map.detach().cpu().numpy()
    flat = np.asarray(class_map).ravel()
    if flat.dtype == bool:
        flat = flat.astype(np.uint8)
    if not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"class map must hold integer class indices, got dtype {flat.dtype}")
    ignored = 0
    if ignore_index is not None:
        keep = flat != ignore_index
        ignored = int(flat.size - np.count_nonzero(keep))
        if ignored:
            flat = flat[keep]
    if flat.size:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise ValueError(f"class map holds index {bad}, outside 0..{n - 1} "
                             f"({n} classes) and not ignore_index={ignore_index}")
    # bincount wants non-negative ints; intp avoids a uint64 -> float cast.
    return np.bincount(flat.astype(np.intp, copy=False), minlength=n).astype(np.int64), ignored


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def _derive(scheme: str, names: Sequence[str], props: Mapping[str, Mapping[str, Any]],
            counts: np.ndarray, ignored: int) -> dict[str, Any]:
    """Fractions and composite C from integer counts (shared by stats and aggregate)."""
    total = int(counts.sum()) + int(ignored)
    surf = np.array([props[n]["surface"] for n in names])
    known = surf != "unknown"
    cvals = np.array([props[n]["c"] if props[n]["c"] is not None else (0.0, 0.0, 0.0)
                      for n in names], dtype=np.float64).reshape(len(names), 3)
    n_known = int(counts[known].sum())
    n_unknown = total - n_known
    by_surface = {s: int(counts[surf == s].sum()) for s in _CLASSIFIED}
    # Area-weighted mean over classified pixels only: unknown rows are masked out of
    # numerator and denominator alike.
    weighted = (counts[known, None].astype(np.float64) * cvals[known]).sum(axis=0)
    c_low, c_typ, c_high = (_ratio(v, n_known) for v in weighted)
    return {
        "scheme": scheme,
        "pixels_total": total,
        "pixels_ignored": int(ignored),
        "pixels_known": n_known,
        "pixels_unknown": n_unknown,
        "class_pixels": {n: int(k) for n, k in zip(names, counts)},
        "class_fractions": {n: _ratio(k, total) for n, k in zip(names, counts)},
        "unknown_fraction": _ratio(n_unknown, total),
        "impervious_fraction": _ratio(by_surface["impervious"], n_known),
        "pervious_fraction": _ratio(by_surface["pervious"], n_known),
        "water_fraction": _ratio(by_surface["water"], n_known),
        "C_low": c_low,
        "C_typical": c_typ,
        "C_high": c_high,
        "properties": {n: {"surface": props[n]["surface"],
                           "c": None if props[n]["c"] is None else list(props[n]["c"])}
                       for n in names},
    }


def surface_stats(class_map: Any, class_names: Sequence[str], table: PropertyTable,
                  ignore_index: int | None = 255) -> dict[str, Any]:
    """Surface fractions and composite runoff coefficient of one class map.

    Args:
        class_map: integer class indices, numpy array or torch tensor, any shape
            (normally ``(H, W)``).
        class_names: name of each class index (index order).
        table: surface properties; must have an entry for every name.
        ignore_index: value counted as unknown (not a class); ``None`` for none.

    Returns:
        A dict: ``pixels_total``, ``pixels_ignored``, ``pixels_known``,
        ``pixels_unknown``; ``class_pixels`` and ``class_fractions`` (share of *all*
        pixels) per class; ``unknown_fraction`` (share of all pixels that is ignored or of
        an unknown surface); ``impervious_fraction``, ``pervious_fraction``,
        ``water_fraction`` (shares of known pixels, summing to 1); ``C_low``,
        ``C_typical``, ``C_high`` (``sum(A_k C_k) / sum(A_k)`` over known classes); the
        ``properties`` used. Ratios with a zero denominator are NaN.

    Raises:
        ValueError: a non-integer map, an index outside the classes, or a class the
            table lacks.
    """
    names = tuple(class_names)
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"surface property table ({table.scheme}, {table.source}) has no "
                         f"entry for class(es) {missing}")
    counts, ignored = _counts(class_map, len(names), ignore_index)
    return _derive(table.scheme, names, table.to_dict(), counts, ignored)


def stats_from_counts(counts: np.ndarray, class_names: Sequence[str], table: PropertyTable,
                      ignored: int = 0) -> dict[str, Any]:
    """:func:`surface_stats` of a map known only by its class counts (counted on the
    model's device, or per zone): the same derivation.

    Args:
        counts: pixels per class, in ``class_names`` order.
        ignored: pixels of no class (outside the survey).
    """
    names = tuple(class_names)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (len(names),):
        raise ValueError(f"{counts.shape} counts for {len(names)} classes")
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"surface property table ({table.scheme}, {table.source}) has no "
                         f"entry for class(es) {missing}")
    return _derive(table.scheme, names, table.to_dict(), counts, int(ignored))


def aggregate(stats_list: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine :func:`surface_stats` results of many images (a folder).

    Pixel counts are summed first and the ratios derived from the sums, so the result is
    area-weighted and equals the stats of all maps taken together (not the mean of
    per-image ratios, which would weight a small image like a large one).

    Args:
        stats_list: results of :func:`surface_stats`, all with the same classes and
            properties.

    Returns:
        A dict with the keys of :func:`surface_stats`, plus ``images`` (how many).

    Raises:
        ValueError: an empty list, or results made with different classes or tables.
    """
    if not stats_list:
        raise ValueError("aggregate() needs at least one surface_stats result")
    first = stats_list[0]
    names = tuple(first["class_pixels"])
    for i, s in enumerate(stats_list[1:], start=1):
        if (tuple(s["class_pixels"]) != names or s["properties"] != first["properties"]
                or s["scheme"] != first["scheme"]):
            raise ValueError(f"stats {i} uses different classes or surface properties than "
                             "stats 0; aggregate results of one scheme and table only")
    counts = np.zeros(len(names), dtype=np.int64)
    ignored = 0
    for s in stats_list:
        counts += np.array([s["class_pixels"][n] for n in names], dtype=np.int64)
        ignored += int(s["pixels_ignored"])
    out = _derive(first["scheme"], names, first["properties"], counts, ignored)
    out["images"] = len(stats_list)
    return out


def peak_flow(c: float, intensity_mm_per_h: float, area_m2: float) -> float:
    """Rational-Method peak runoff ``Q = C i A`` in SI units.

    Args:
        c: composite runoff coefficient (for example ``stats["C_typical"]``).
        intensity_mm_per_h: design rainfall intensity for a duration equal to the time of
            concentration, mm/h.
        area_m2: catchment area, m^2.

    Returns:
        Peak flow in m^3/s (mm/h -> m/s is a factor 1 / 3.6e6).
    """
    return float(c) * float(intensity_mm_per_h) * float(area_m2) / 3.6e6
