"""Flood mapping for GIS users: georeferenced orthomosaics in, GeoTIFFs and zones out.

Modules:

* :mod:`~segcore.gis.raster`: a GeoTIFF read window by window (nodata / alpha masks,
  RGBA, 16-bit stretch), predicted block by block with the tile plan of
  :mod:`segcore.predict.blocks`, written as a Cloud-Optimized GeoTIFF class raster with a
  colour table (and optionally a confidence raster), atomically.
* :mod:`~segcore.gis.zones`: polygons (GeoJSON / GeoPackage) or a square grid ->
  per-zone areas, surface fractions, runoff coefficients and rational-method peak flow,
  written as ``zones.gpkg``, ``zones.geojson`` and ``zones.csv``.
* :mod:`~segcore.gis.cli`: the flags ``launch/predict.py`` adds and the run it hands
  GeoTIFF inputs to.

rasterio, shapely and pyogrio are optional (the ``gis`` extra); they are imported only
when a GIS run starts, and :func:`require` turns their absence into one line.
"""

from __future__ import annotations

import importlib

__all__ = ["GisError", "INSTALL_HINT", "require"]

INSTALL_HINT = 'pip install "segbench[gis]"'


class GisError(ValueError):
    """Bad GIS input (raster, zones, CRS, disk space); one-line message."""


def require() -> None:
    """Check that the optional GIS dependencies import.

    Raises:
        GisError: one of rasterio, shapely, pyogrio is missing; the message says what to
            install.
    """
    missing = []
    for name in ("rasterio", "shapely", "pyogrio"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise GisError(f"GeoTIFF input and --zones/--grid need {', '.join(missing)}; "
                       f"install them with: {INSTALL_HINT}")
