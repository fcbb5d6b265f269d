"""The GIS run of ``launch/predict.py``: GeoTIFF inputs, zones and grids.

``launch/predict.py`` adds the flags of :func:`add_gis_arguments` to its parser and,
when :func:`wants_gis` says so (a ``.tif``/``.tiff`` under ``--images``, or ``--zones``
/ ``--grid``), hands the run to :func:`run_gis`. :func:`main` does the same on its own
(the launcher's parser plus these flags), for tests and ``python -m segcore.gis.cli``.

Outputs in ``--out``: per GeoTIFF ``<stem>_classes.tif`` (+ ``.aux.xml`` category names,
+ ``<stem>_confidence.tif`` with ``--confidence``); ``rasters.csv`` / ``rasters.json``
(one row per raster: pixels, surveyed m^2, fractions, C); with ``--zones`` or
``--grid``: ``zones.gpkg``, ``zones.geojson``, ``zones.csv``. Other photos in the folder
go through the ordinary folder run (:func:`segcore.predict.folder.predict_folder`:
PNGs and ``surface_stats.csv``, shares in percent).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from segcore.gis import GisError, require
from segcore.gis.raster import GEOTIFF_EXTS

__all__ = ["add_gis_arguments", "wants_gis", "run_gis", "main"]

REPO = Path(__file__).resolve().parents[2]


def add_gis_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the GIS flags to ``launch/predict.py``'s parser (once; a second call is a no-op).

    Args:
        parser: the launcher's parser.
    """
    if any("--zones" in a.option_strings for a in parser._actions):
        return
    g = parser.add_argument_group(
        "GIS (GeoTIFF orthomosaics; needs the gis extra: pip install \"segbench[gis]\")")
    g.add_argument("--zones", metavar="FILE",
                   help="polygons (GeoJSON or GeoPackage: blocks, parcels, catchments), "
                        "reprojected to the raster's CRS: per-zone statistics in "
                        "zones.gpkg / zones.geojson / zones.csv")
    g.add_argument("--grid", type=float, metavar="METRES",
                   help="square cells of this side (in the raster's CRS units, metres) "
                        "instead of --zones")
    g.add_argument("--rain-mm-h", type=float, metavar="MM_PER_H",
                   help="design rainfall intensity i (mm/h) for the rational-method peak "
                        "flow Q = C i A / 3.6e6 in m^3/s per zone (none: no peak flow)")
    g.add_argument("--confidence", action="store_true",
                   help="also write <stem>_confidence.tif (probability of the predicted "
                        "class, percent)")


# TIFF tags that georeference a file: GeoKeyDirectory, ModelTiepoint, ModelTransformation.
_GEO_TAGS = (34735, 33922, 34264)


def _is_geotiff(p: Path) -> bool:
    """A ``.tif``/``.tiff`` that carries GeoTIFF tags (or that PIL cannot open, e.g. a
    BigTIFF: GDAL decides). A plain TIFF photo stays on the ordinary path."""
    if p.suffix.lower() not in GEOTIFF_EXTS:
        return False
    from PIL import Image

    try:
        with Image.open(p) as im:  # reads the header only
            tags = getattr(im, "tag_v2", {})
            return any(t in tags for t in _GEO_TAGS)
    except Exception:  # PIL refuses it: let GDAL read it (or say why it cannot)
        return True


def wants_gis(args: argparse.Namespace) -> bool:
    """Whether the run is a GIS run: ``--zones``/``--grid``, or a GeoTIFF (a TIFF with
    GeoTIFF tags) under ``--images``. Needs neither rasterio nor a model."""
    if getattr(args, "zones", None) or getattr(args, "grid", None) is not None:
        return True
    images = Path(args.images)
    if images.is_file():
        return _is_geotiff(images)
    return images.is_dir() and any(p.is_file() and not p.name.startswith(".")
                                   and _is_geotiff(p) for p in images.iterdir())


@dataclass
class _Prepared:
    """The loaded checkpoint, its property table, the settled settings, the tiled model
    (:class:`segcore.gis.raster.TiledModel`) and the run's metadata."""

    loaded: Any
    table: Any
    settings: Any
    model: Any
    meta: dict[str, Any]


def _prepare(args: argparse.Namespace, settings: Any) -> _Prepared:
    """Load the checkpoint and settle the settings (the photo run's own checks:
    :func:`segcore.predict.folder.settled_for`)."""
    from segcore.gis.raster import TiledModel
    from segcore.precision import DTYPES
    from segcore.predict.flood import load_properties
    from segcore.predict.folder import prediction_device, settled_for
    from segcore.predict.model import load_model

    device = prediction_device(settings)
    loaded = load_model(args.checkpoint, device)
    table = load_properties(getattr(args, "properties", None), loaded.scheme.name)
    settings = settled_for(loaded, settings)
    model = TiledModel(loaded.model, loaded.num_out_channels, settings.tile, settings.overlap,
                       settings.batch_size, device,
                       None if settings.precision == "fp32" else DTYPES[settings.precision],
                       settings.channels_last, settings.threshold, settings.max_block_mb)
    meta = {"checkpoint": str(Path(args.checkpoint)), "epoch": loaded.epoch,
            "device": str(device), "scheme": loaded.scheme.name}
    return _Prepared(loaded, table, settings, model, meta)


def _zone_source(args: argparse.Namespace, info: Any) -> Any:
    """The zones of one raster (loaded and reprojected to its CRS), checked to overlap."""
    from segcore.gis.zones import check_overlap, grid_zones, load_zones

    if not info.georeferenced:
        raise GisError(f"{info.path} has no coordinate reference system or geotransform, "
                       "so --zones/--grid cannot be placed on it; georeference it (e.g. "
                       "gdal_translate -a_srs EPSG:xxxx -a_ullr ...) or drop --zones/--grid")
    if info.pixel_area_m2 is None:
        raise GisError(f"{info.path} is in a geographic CRS ({info.crs.to_string()}), whose "
                       "degrees give no square metres; reproject it first, e.g. gdalwarp "
                       "-t_srs EPSG:<UTM zone> in.tif out.tif")
    bounds = _bounds(info)
    zones = (grid_zones(bounds, args.grid, info.crs) if args.grid is not None
             else load_zones(args.zones, info.crs))
    check_overlap(zones, bounds)
    return zones


def _bounds(info: Any) -> tuple[float, float, float, float]:
    from rasterio.transform import array_bounds

    return tuple(array_bounds(info.height, info.width, info.transform))  # (w, s, e, n)


def _check_args(args: argparse.Namespace) -> None:
    if args.zones and args.grid is not None:
        raise GisError("give --zones FILE or --grid METRES, not both")
    if args.grid is not None and not (math.isfinite(args.grid) and args.grid > 0):
        raise GisError(f"--grid {args.grid:g} must be a positive cell side in metres")
    if args.rain_mm_h is not None and not (math.isfinite(args.rain_mm_h)
                                           and args.rain_mm_h > 0):
        raise GisError(f"--rain-mm-h {args.rain_mm_h:g} must be a positive intensity in mm/h")


def _plan(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[list, list, list, dict]:
    """Cheap checks before the model loads: inputs, rasters, zones."""
    from segcore.data.images import list_images
    from segcore.data.layouts import DatasetError
    from segcore.gis.raster import inspect_raster

    _check_args(args)
    try:
        files = list_images(args.images)
    except DatasetError as e:
        raise GisError(str(e)) from None
    zoned = bool(args.zones) or args.grid is not None
    # With zones every TIFF is a raster (one without CRS is refused); without, a TIFF
    # without GeoTIFF tags is a photo, predicted as today.
    is_raster = ((lambda p: p.suffix.lower() in GEOTIFF_EXTS) if zoned else _is_geotiff)
    rasters = [p for p in files if is_raster(p)]
    photos = [p for p in files if not is_raster(p)]
    if zoned and not rasters:
        raise GisError(f"--zones/--grid need GeoTIFF input (.tif/.tiff) under {args.images}")
    infos, skipped, zones = [], [], {}
    for p in rasters:
        try:
            infos.append(inspect_raster(p))
        except GisError as e:
            if len(files) == 1:
                raise
            skipped.append({"image": p.name, "error": str(e)})
            say(f"skipped {p}: {e}")
    for info in infos if zoned else ():
        zones[info.path] = _zone_source(args, info)
    crss = {info.crs.to_string() for info in infos if info.path in zones}
    if len(crss) > 1:
        raise GisError(f"the GeoTIFFs under {args.images} are in {len(crss)} CRSs "
                       f"({', '.join(sorted(crss))}); one zones layer needs one CRS: run "
                       "them separately or reproject them with gdalwarp")
    return infos, photos, skipped, zones


def _raster_row(info: Any, res: Any, names: Any, seconds: float) -> dict[str, Any]:
    from segcore.predict.folder import image_row

    row = image_row(info.path.name, info.width, info.height, res.stats, names,
                    seconds=seconds)
    area = info.pixel_area_m2
    row["nodata_pixels"] = res.nodata_pixels
    row["surveyed_m2"] = None if area is None else res.stats["pixels_total"] * area
    row["pixel_area_m2"] = area
    row["crs"] = info.crs.to_string() if info.crs is not None else None
    row["classes_tif"] = res.classes.name
    return row


def _write_table(out: Path, stem: str, rows: list[dict[str, Any]], meta: dict) -> None:
    import pandas as pd

    from segcore.gis.raster import atomic_paths

    with atomic_paths(out / f"{stem}.csv", out / f"{stem}.json") as (csv, js):
        pd.DataFrame(rows).to_csv(csv, index=False)
        js.write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str,
                                 allow_nan=True))


def _predict_rasters(prep: _Prepared, infos: list, zones: dict, args: argparse.Namespace,
                     out: Path, hooks: Any, photos: int) -> tuple[list, list, list]:
    """Predict every raster (and its zones); a failing raster is skipped unless alone."""
    import time

    from segcore.gis.raster import predict_raster
    from segcore.gis.zones import zone_rows

    sch = prep.loaded.scheme
    rows, zrows, skipped = [], [], []
    for index, info in enumerate(infos):
        t0 = time.perf_counter()
        if hooks.image_started:
            from segcore.predict.blocks import plan_blocks

            m = prep.model
            tiles = sum(b.tiles for b in plan_blocks(info.height, info.width, m.tile,
                                                     m.overlap, m.num_out_channels,
                                                     m.max_block_mb))
            hooks.image_started(index, len(infos), info.path.name, tiles)
        try:
            res = predict_raster(prep.model, info, out, sch.names, sch.colors, prep.table,
                                 confidence=args.confidence, progress=hooks.tiles_done)
        except GisError as e:
            if "disk space" in str(e) or (len(infos) == 1 and not photos):
                raise
            skipped.append({"image": info.path.name, "error": str(e)})
            hooks.say(f"skipped {info.path}: {e}")
            continue
        row = _raster_row(info, res, sch.names, time.perf_counter() - t0)
        rows.append(row)
        if info.path in zones:
            zrows += zone_rows(res.classes, zones[info.path], sch.names, prep.table,
                               info.pixel_area_m2, args.rain_mm_h, raster=info.path.name,
                               keep_empty=args.grid is None)
        if hooks.image_finished:
            hooks.image_finished(index, len(infos), row)
    return rows, zrows, skipped


def _summary(rows: list, zrows: list, skipped: list, out: Path, args: argparse.Namespace,
             photos_done: int) -> None:
    def pct(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{v:.1%}"

    print(f"predicted {len(rows)} raster(s)"
          + (f" and {photos_done} photo(s) (surface_stats.csv)" if photos_done else "")
          + (f", {len(skipped)} skipped (listed above)" if skipped else "")
          + (f" -> {out}/rasters.csv" if rows else f" -> {out}"), flush=True)
    for r in rows:
        area = (f"{r['surveyed_m2']:.1f} m2 surveyed" if r["surveyed_m2"] is not None
                else "no projected CRS: shares of pixels only")
        print(f"{r['image']}: {r['pixels']} surveyed px ({area}), {r['nodata_pixels']} "
              f"nodata px; impervious {pct(r['impervious_fraction'])}, water "
              f"{pct(r['water_fraction'])} of classified, C {r['C_typical']:.3f}",
              flush=True)
    if zrows:
        flow = ""
        if args.rain_mm_h is not None:
            top = max(zrows, key=lambda z: _nz(z["peak_flow_m3_s"]))
            flow = (f"; largest peak flow at {args.rain_mm_h:g} mm/h: "
                    f"{_nz(top['peak_flow_m3_s']):.4g} m3/s (zone {top['zone']}, "
                    f"{top['pixels']} px)")
        with_px = sum(1 for z in zrows if z["pixels"])
        print(f"zones: {len(zrows)} ({with_px} with surveyed pixels, "
              f"{sum(z['pixels'] for z in zrows)} px in all){flow} -> {out}/zones.gpkg, "
              "zones.geojson, zones.csv", flush=True)
        if args.rain_mm_h is None:
            print("no --rain-mm-h: no peak-flow columns", flush=True)


def _nz(v: Any) -> float:
    return 0.0 if v is None or v != v else float(v)


def run_gis(args: argparse.Namespace, settings: Any, hooks: Any) -> int:
    """The GIS run (see the module docstring); prints its own summary and errors.

    Args:
        args: the launcher's parsed arguments, with :func:`add_gis_arguments`'s.
        settings: the launcher's :class:`segcore.predict.folder.PredictSettings`.
        hooks: the launcher's :class:`segcore.predict.folder.Hooks`.

    Returns:
        Exit status: 0 done, 1 no input could be read, 2 bad arguments or inputs, 3 out
        of memory.
    """
    from segcore.config import ConfigError
    from segcore.faults import is_oom
    from segcore.predict import PredictError

    try:
        return _run(args, settings, hooks)
    except (GisError, PredictError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        if is_oom(e):
            print(f"error: out of memory: {str(e).splitlines()[0] if str(e) else e}. Lower "
                  "--batch-size, --tile or --max-block-mb", file=sys.stderr, flush=True)
            return 3
        raise


def _run(args: argparse.Namespace, settings: Any, hooks: Any) -> int:
    require()
    infos, photos, skipped, zones = _plan(args, hooks.say)
    if not infos and not photos:
        reason = f": {skipped[0]['error']}" if len(skipped) == 1 else " (see above)"
        print(f"error: none of the {len(skipped)} raster(s) could be read{reason}",
              file=sys.stderr, flush=True)
        return 1
    if getattr(args, "truth", None) and infos:
        hooks.say(f"--truth: compared for the {len(photos)} photo(s) only; the "
                  f"{len(infos)} GeoTIFF(s) have no truth comparison")
    prep = _prepare(args, settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos_done = 0
    if photos:
        from segcore.data.images import find_truth
        from segcore.data.layouts import DatasetError
        from segcore.predict.folder import predict_folder

        try:
            truth = find_truth(args.truth, photos) if getattr(args, "truth", None) else None
        except DatasetError as e:
            raise GisError(str(e)) from None
        res = predict_folder(prep.loaded.model, prep.loaded.scheme, photos, out,
                             num_out_channels=prep.loaded.num_out_channels,
                             table=prep.table, settings=prep.settings,
                             device=prep.model.device, truth=truth,
                             truth_kind=getattr(args, "truth_kind", "target"),
                             meta=prep.meta, hooks=hooks)
        photos_done, skipped = res.images_done, skipped + res.skipped
    rows, zrows, failed = _predict_rasters(prep, infos, zones, args, out, hooks,
                                           len(photos))
    skipped += failed
    if not rows and not photos_done:
        reason = f": {skipped[0]['error']}" if len(skipped) == 1 else " (see above)"
        print(f"error: none of the {len(skipped)} input(s) could be read{reason}",
              file=sys.stderr, flush=True)
        return 1
    meta = {**prep.meta, "settings": prep.settings.to_dict(), "skipped": skipped,
            "properties_source": prep.table.source, "nodata_class": 255,
            "notes": "fractions over surveyed pixels (nodata/alpha excluded); impervious, "
                     "pervious, water over classified pixels; areas in m^2"}
    if rows:
        _write_table(out, "rasters", rows, meta)
    if zrows:
        from segcore.gis.zones import write_zones

        write_zones(out, zrows, next(iter(zones.values())).crs)
    _summary(rows, zrows, skipped, out, args, photos_done)
    return 0


def launcher_parser() -> argparse.ArgumentParser:
    """``launch/predict.py``'s parser with the GIS flags added."""
    spec = importlib.util.spec_from_file_location("launch_predict_for_gis",
                                                  REPO / "launch" / "predict.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    p = launcher.parser()
    add_gis_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``launch/predict.py``'s flags plus the GIS ones and run :func:`run_gis`.

    Returns:
        The exit status of :func:`run_gis` (2 for bad settings).
    """
    from segcore.config import ConfigError
    from segcore.predict.folder import Hooks, PredictSettings

    a = launcher_parser().parse_args(argv)
    try:
        settings = PredictSettings(
            tile=a.tile, overlap=a.overlap, batch_size=a.batch_size, device=a.device,
            precision=a.precision, threshold=a.threshold, max_block_mb=a.max_block_mb,
            overlay_max_side=a.overlay_max_side, max_image_pixels=a.max_image_pixels)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return run_gis(a, settings, Hooks(log=lambda m: print(m, file=sys.stderr, flush=True)))


if __name__ == "__main__":
    sys.exit(main())
