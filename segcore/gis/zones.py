"""Statistics where planners decide: per zone (polygons or a square grid) of a class raster.

Zones come from a GeoJSON or GeoPackage file (blocks, parcels, catchments; read with
pyogrio, reprojected to the raster's CRS with GDAL through
:func:`rasterio.warp.transform_geom`) or from ``--grid METRES`` square cells aligned to
multiples of the cell size in the raster's CRS.

A pixel belongs to a zone when its centre lies inside the polygon (GDAL's rasterize rule,
``all_touched=False``); each zone is rasterized on its own, so overlapping zones (a
catchment and its sub-catchments) each get all of their pixels. The class raster is read
in strips of the zone's bounding window, so memory stays bounded by
``max_strip_pixels`` whatever the zone's size. Pixels with the class raster's nodata
value (outside the survey) count in no fraction.

Per zone:

* ``area_m2``: the polygon's area (m^2, in the raster's projected CRS);
  ``surveyed_m2``: its pixels inside the survey times the pixel area; ``coverage``:
  their ratio, how much of the zone the numbers rest on;
* ``impervious_fraction``, ``pervious_fraction``, ``water_fraction``: shares of the
  classified surveyed pixels (they sum to 1); ``unknown_fraction``: share of the surveyed
  pixels whose class has no surface kind; exactly as
  :func:`segcore.predict.flood.surface_stats` computes them;
* ``C_low``, ``C_typical``, ``C_high``: the area-weighted runoff coefficient;
* with a design rainfall intensity ``i`` (mm/h): the rational method's peak flow
  ``Q = C i A / 3.6e6`` in m^3/s (``peak_flow_m3_s`` with ``C_typical``, and
  ``_low``/``_high``), ``A = area_m2``: the surveyed part's C stands for the whole zone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from segcore.gis import GisError
from segcore.gis.raster import NODATA, atomic_paths, open_raster

__all__ = ["Zones", "load_zones", "grid_zones", "check_overlap", "zone_rows",
           "write_zones", "ZONE_COLUMNS"]

MAX_STRIP_PIXELS = 4 << 20
ZONE_COLUMNS = ("raster", "zone", "area_m2", "surveyed_m2", "coverage", "pixels",
                "nodata_pixels", "impervious_fraction", "pervious_fraction",
                "water_fraction", "unknown_fraction", "C_low", "C_typical", "C_high")
_POLYGONAL = ("Polygon", "MultiPolygon")


@dataclass
class Zones:
    """Zone polygons in one CRS.

    Attributes:
        geoms: shapely (multi)polygons.
        names: one label per zone (the file's ``name``/``id`` field, else its row number).
        fields: the file's attribute columns, ``{name: values}``.
        crs: the rasterio CRS of ``geoms``.
        source: the file, or ``grid <m> m``.
    """

    geoms: list[Any]
    names: list[str]
    fields: dict[str, list[Any]]
    crs: Any
    source: str


def load_zones(path: str | Path, crs: Any) -> Zones:
    """Read zone polygons and reproject them to ``crs``.

    Args:
        path: GeoJSON or GeoPackage (any vector format GDAL reads) of polygons.
        crs: the raster's CRS.

    Returns:
        :class:`Zones` in ``crs``.

    Raises:
        GisError: unreadable file, no features, non-polygon geometries, no CRS on a
            file that is not GeoJSON, or a CRS that cannot be transformed to ``crs``.
    """
    import pyogrio
    import shapely
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    path = Path(path)
    if not path.is_file():
        raise GisError(f"zones file {path} does not exist")
    try:
        meta, _, wkb, field_data = pyogrio.raw.read(path)
    except Exception as e:  # pyogrio's DataSourceError, DataLayerError, ...
        raise GisError(f"zones file {path} cannot be read ({str(e).strip()[:200]}); give "
                       "a GeoJSON or GeoPackage of polygons") from None
    if wkb is None or len(wkb) == 0:
        raise GisError(f"zones file {path} has no features")
    geoms = list(shapely.from_wkb(wkb))
    kinds = sorted({g.geom_type for g in geoms if g is not None} - set(_POLYGONAL))
    if kinds or any(g is None or g.is_empty for g in geoms):
        raise GisError(f"zones file {path} holds {', '.join(kinds) or 'empty'} geometries; "
                       "zones must be polygons or multipolygons")
    if not meta.get("crs"):
        raise GisError(f"zones file {path} has no coordinate reference system; assign one "
                       "(e.g. ogr2ogr -a_srs EPSG:32633 out.gpkg in.gpkg)")
    try:
        src_crs = CRS.from_user_input(meta["crs"])
    except CRSError as e:
        raise GisError(f"zones file {path}: its CRS {meta['crs']!r} is not understood "
                       f"({e}); reproject it to the raster's CRS") from None
    geoms = _reproject(geoms, src_crs, crs, path)
    fields = {str(n): list(v) for n, v in zip(meta["fields"], field_data)}
    label = next((fields[k] for k in ("name", "id", "zone") if k in fields), None)
    names = ([str(v) for v in label] if label is not None
             else [str(i) for i in range(len(geoms))])
    return Zones(geoms, names, fields, crs, str(path))


def _reproject(geoms: list[Any], src_crs: Any, dst_crs: Any, path: Path) -> list[Any]:
    """Polygons from ``src_crs`` to ``dst_crs`` (GDAL/PROJ), refusing what cannot go."""
    import shapely
    from rasterio.warp import transform_geom

    if src_crs == dst_crs:
        return geoms
    try:
        out = [shapely.geometry.shape(transform_geom(src_crs, dst_crs,
                                                     shapely.geometry.mapping(g)))
               for g in geoms]
    except Exception as e:  # CRSError, GDAL's transformer errors: all one line
        raise GisError(f"zones file {path}: its CRS ({crs_name(src_crs)}) cannot be "
                       f"transformed to the raster's ({crs_name(dst_crs)}): "
                       f"{str(e).strip()[:60]}...; reproject the zones first") from None
    bad = [i for i, g in enumerate(out)
           if g.is_empty or not np.isfinite(shapely.get_coordinates(g)).all()]
    if bad:
        raise GisError(f"zones file {path}: {len(bad)} zone(s) (e.g. row {bad[0]}) cannot "
                       f"be transformed to the raster's CRS ({crs_name(dst_crs)}); "
                       "reproject the zones first")
    return out


def crs_name(crs: Any) -> str:
    """``EPSG:n`` where there is one, else the CRS's own name from its WKT."""
    epsg = crs.to_epsg()
    if epsg:
        return f"EPSG:{epsg}"
    wkt = crs.to_wkt()
    return wkt.split('"')[1] if '"' in wkt else wkt[:60]


def grid_zones(bounds: Sequence[float], cell: float, crs: Any) -> Zones:
    """Square cells of ``cell`` CRS units covering ``bounds``, aligned to multiples of it.

    Args:
        bounds: ``(left, bottom, right, top)`` of the raster.
        cell: the cell side (metres in a metric CRS).
        crs: the raster's CRS.

    Returns:
        :class:`Zones` named ``<col>_<row>`` (from the top-left cell).
    """
    import shapely

    if not (isinstance(cell, (int, float)) and math.isfinite(cell) and cell > 0):
        raise GisError(f"--grid {cell!r} must be a positive cell side in metres")
    left, bottom, right, top = bounds
    x0, y1 = math.floor(left / cell) * cell, math.ceil(top / cell) * cell
    nx = max(1, math.ceil((right - x0) / cell - 1e-9))
    ny = max(1, math.ceil((y1 - bottom) / cell - 1e-9))
    if nx * ny > 1_000_000:
        raise GisError(f"--grid {cell:g} makes {nx * ny} cells over the raster; use a "
                       "larger cell (at most 1,000,000 cells)")
    geoms, names = [], []
    for r in range(ny):
        for c in range(nx):
            xa, yb = x0 + c * cell, y1 - (r + 1) * cell
            geoms.append(shapely.box(xa, yb, xa + cell, yb + cell))
            names.append(f"{c}_{r}")
    return Zones(geoms, names, {}, crs, f"grid {cell:g} m")


def check_overlap(zones: Zones, bounds: Sequence[float]) -> int:
    """How many zones overlap the raster's bounds.

    Raises:
        GisError: none does (wrong file, or a CRS mislabelled in the zones file).
    """
    import shapely

    frame = shapely.box(*bounds)
    n = int(np.count_nonzero(shapely.intersects(np.array(zones.geoms, dtype=object), frame)))
    if n == 0:
        zb = shapely.total_bounds(np.array(zones.geoms, dtype=object))
        raise GisError(f"none of the {len(zones.geoms)} zone(s) of {zones.source} overlaps "
                       f"the raster (zones span {_fmt_bounds(zb)}, the raster "
                       f"{_fmt_bounds(bounds)} in {crs_name(zones.crs)}); check the files "
                       "and their CRS")
    return n


def _fmt_bounds(b: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in b) + ")"


def _zone_stats(src: Any, geom: Any, names: Sequence[str], table: Any,
                max_strip_pixels: int) -> tuple[dict[str, Any], int]:
    """Aggregated surface stats of the surveyed pixels whose centre is in ``geom``."""
    from rasterio.features import geometry_mask
    from rasterio.windows import Window, from_bounds

    from segcore.predict.flood import aggregate, surface_stats

    win = from_bounds(*geom.bounds, transform=src.transform)
    # Whole pixels around the bounds (one more on each side: centres on the edge),
    # clipped to the raster.
    c0 = max(0, math.floor(win.col_off) - 1)
    r0 = max(0, math.floor(win.row_off) - 1)
    c1 = min(src.width, math.ceil(win.col_off + win.width) + 1)
    r1 = min(src.height, math.ceil(win.row_off + win.height) + 1)
    parts, nodata = [], 0
    if c1 > c0 and r1 > r0:
        w = c1 - c0
        rows = max(1, max_strip_pixels // w)
        for r in range(r0, r1, rows):
            strip = Window(c0, r, w, min(rows, r1 - r))
            cls = src.read(1, window=strip)
            inside = geometry_mask([geom], out_shape=cls.shape, invert=True,
                                   transform=src.window_transform(strip))
            sel = cls[inside]
            valid = sel != NODATA
            nodata += int(sel.size - np.count_nonzero(valid))
            parts.append(surface_stats(sel[valid], names, table, ignore_index=None))
    if not parts:
        parts.append(surface_stats(np.zeros(0, np.uint8), names, table, ignore_index=None))
    return aggregate(parts), nodata


def zone_rows(class_tif: Path, zones: Zones, names: Sequence[str], table: Any,
              pixel_area: float, rain_mm_h: float | None, raster: str = "",
              max_strip_pixels: int = MAX_STRIP_PIXELS, keep_empty: bool = True
              ) -> list[dict[str, Any]]:
    """One statistics row per zone from a class raster.

    Args:
        class_tif: uint8 class raster (nodata :data:`NODATA`), in ``zones.crs``.
        zones: the zones.
        names: class names in index order.
        table: the :class:`segcore.predict.flood.PropertyTable`.
        pixel_area: m^2 per pixel.
        rain_mm_h: design rainfall intensity (mm/h) for the peak flow; ``None``: no
            peak-flow columns.
        raster: the ``raster`` column (the input file name).
        max_strip_pixels: pixels read at once.
        keep_empty: keep zones without surveyed pixels (their ratios are NaN); grid
            cells outside the survey are dropped.

    Returns:
        Rows with :data:`ZONE_COLUMNS` (+ ``peak_flow_m3_s*``, + the file's fields).
    """
    from segcore.predict.flood import peak_flow

    rows = []
    with open_raster(class_tif) as src:
        for i, (geom, name) in enumerate(zip(zones.geoms, zones.names)):
            stats, nodata = _zone_stats(src, geom, names, table, max_strip_pixels)
            if not keep_empty and stats["pixels_total"] == 0:
                continue
            area = float(geom.area) * zones.crs.linear_units_factor[1] ** 2
            surveyed = stats["pixels_total"] * pixel_area
            row = {"raster": raster, "zone": name, "area_m2": area,
                   "surveyed_m2": surveyed, "coverage": surveyed / area if area else math.nan,
                   "pixels": stats["pixels_total"], "nodata_pixels": nodata}
            for k in ZONE_COLUMNS[7:]:
                row[k] = stats[k]
            if rain_mm_h is not None:
                for lvl in ("low", "typical", "high"):
                    key = "peak_flow_m3_s" + ("" if lvl == "typical" else f"_{lvl}")
                    row[key] = peak_flow(stats[f"C_{lvl}"], rain_mm_h, area)
                row["rain_mm_h"] = rain_mm_h
            for k, v in zones.fields.items():
                row.setdefault(k, v[i])
            row["_geom"] = geom
            rows.append(row)
    return rows


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k != "_geom":
                cols.setdefault(k, None)
    return list(cols)


def write_zones(out: Path, rows: Sequence[dict[str, Any]], crs: Any) -> list[Path]:
    """Write ``zones.gpkg``, ``zones.geojson`` and ``zones.csv`` atomically.

    The units are in the column names (``area_m2``, ``rain_mm_h``, ``peak_flow_m3_s``);
    the vector layers are in the raster's CRS.

    Args:
        out: output folder.
        rows: from :func:`zone_rows` (all in ``crs``).
        crs: the rows' CRS (the raster's).

    Returns:
        The three paths.
    """
    import pandas as pd
    import pyogrio
    import shapely

    cols = _columns(rows)
    frame = pd.DataFrame([{k: r.get(k) for k in cols} for r in rows], columns=cols)
    geoms = [shapely.multipolygons([g]) if g.geom_type == "Polygon" else g
             for g in (r["_geom"] for r in rows)]
    wkb = np.array(shapely.to_wkb(geoms), dtype=object)
    finals = [out / "zones.gpkg", out / "zones.geojson", out / "zones.csv"]
    with atomic_paths(*finals) as parts:
        data = [_field_array(frame[c]) for c in cols]
        for part, driver in zip(parts[:2], ("GPKG", "GeoJSON")):
            # GeoPackage 1.2: read without warnings by the GDAL of older QGIS / Debian.
            opts = {"VERSION": "1.2"} if driver == "GPKG" else {}
            pyogrio.raw.write(part, wkb, data, cols, driver=driver, crs=crs.to_wkt(),
                              geometry_type="MultiPolygon", layer="zones",
                              dataset_options=opts)
        frame.to_csv(parts[2], index=False)
    return finals


def _field_array(col: Any) -> np.ndarray:
    """A column as an array pyogrio can write (numbers float64/int64, else strings)."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(col):
        return col.to_numpy(dtype=np.int64)
    if pd.api.types.is_integer_dtype(col):
        return col.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(col):
        return col.to_numpy(dtype=np.float64)
    return np.array([None if v is None or (isinstance(v, float) and math.isnan(v))
                     else str(v) for v in col], dtype=object)
