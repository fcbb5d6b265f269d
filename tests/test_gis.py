"""GeoTIFF orthomosaics in, COG class rasters and per-zone statistics out (segcore.gis).

The oracle is test_predict's :func:`colour_checkpoint`: a real U-Net checkpoint that
labels every pixel by its red value exactly, so the class raster of a scene is known
pixel by pixel. Scenes are small georeferenced GeoTIFFs (EPSG:32633, 0.5 m pixels) with
a region outside the survey (alpha 0, or the nodata value); the outputs are read back
with rasterio and with GDAL's own gdalinfo / ogrinfo, and the per-zone numbers are
computed by hand from the class raster and the coefficient tables copied in
test_predict (COEF, SURFACE), not from segcore.predict.flood.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

rasterio = pytest.importorskip("rasterio")
shapely = pytest.importorskip("shapely")
pyogrio = pytest.importorskip("pyogrio")

from rasterio.transform import from_origin  # noqa: E402
from rasterio.warp import transform_geom  # noqa: E402

from segcore.data.classes import scheme as make_scheme  # noqa: E402
from segcore.gis import GisError  # noqa: E402
from segcore.gis import cli as gis_cli  # noqa: E402
from segcore.gis import raster as gis_raster  # noqa: E402
from segcore.gis.raster import TiledModel, inspect_raster, predict_raster  # noqa: E402
from segcore.predict.blocks import plan_blocks, predict_classes  # noqa: E402
from segcore.predict.flood import load_properties  # noqa: E402
from test_predict import COEF, SURFACE, colour_checkpoint, launcher, red_code  # noqa: E402

SIX = make_scheme("six")
H, W, PX = 48, 64, 0.5
ORIGIN = (500000.0, 5000000.0)
TRANSFORM = from_origin(*ORIGIN, PX, PX)
CRS = "EPSG:32633"
# Outside the survey: rows 0..11, cols 0..15 (alpha 0 or nodata).
HOLE = (slice(0, 12), slice(0, 16))
# Zones in pixel coordinates (rows, cols), edges on pixel edges: centres are inside or not.
ZONES = {"north": (0, 24, 0, 40), "south-east": (20, 48, 30, 64), "all": (0, 48, 0, 64)}
GDAL = {t: shutil.which(t) for t in ("gdalinfo", "ogrinfo")}


def scene_mask(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, SIX.num_classes, size=(H, W)).astype(np.uint8)


def write_ortho(path: Path, mask: np.ndarray, *, how: str = "alpha", crs=CRS,
                transform=TRANSFORM, dtype="uint8") -> Path:
    """An orthomosaic whose red channel encodes ``mask``; HOLE is outside the survey."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(3, H, W)).astype(np.uint8)
    rgb[0] = np.array([red_code(SIX, k) for k in range(SIX.num_classes)], np.uint8)[mask]
    prof = dict(driver="GTiff", width=W, height=H, dtype=dtype, count=3)
    if crs is not None:
        prof.update(crs=crs, transform=transform)
    if how == "nodata":
        rgb[:, HOLE[0], HOLE[1]] = 0
        prof["nodata"] = 0
    if how == "alpha":
        prof.update(count=4, photometric="RGB", alpha="YES")
    data = rgb.astype(dtype) * (257 if dtype == "uint16" else 1)
    with rasterio.open(path, "w", **prof) as d:
        d.write(data, [1, 2, 3])
        if how == "alpha":
            alpha = np.full((H, W), 255 * (257 if dtype == "uint16" else 1), dtype)
            alpha[HOLE] = 0
            d.write(alpha, 4)
    return path


def expected_classes(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[HOLE] = 255
    return out


def pixel_box(r0: int, r1: int, c0: int, c1: int):
    x0, y0 = ORIGIN
    return shapely.box(x0 + c0 * PX, y0 - r1 * PX, x0 + c1 * PX, y0 - r0 * PX)


def write_zones(path: Path, crs: str = CRS, zones=ZONES, driver="GPKG") -> Path:
    geoms = []
    for r0, r1, c0, c1 in zones.values():
        g = pixel_box(r0, r1, c0, c1)
        if crs != CRS:
            g = shapely.geometry.shape(transform_geom(CRS, crs, shapely.geometry.mapping(g)))
        geoms.append(g)
    pyogrio.raw.write(path, np.array(shapely.to_wkb(geoms), dtype=object),
                      [np.array(list(zones), dtype=object)], ["name"], driver=driver,
                      crs=crs, geometry_type="Polygon")
    return path


def by_hand(classes: np.ndarray, rain: float | None = None, area: float | None = None):
    """Fractions, C and peak flow of a class raster patch, from COEF / SURFACE."""
    vals = classes[classes != 255]
    counts = {n: int((vals == k).sum()) for k, n in enumerate(SIX.names)}
    known = {n: c for n, c in counts.items() if COEF["six"][n] is not None}
    nk = sum(known.values())
    out = {"pixels": int(vals.size),
           "unknown_fraction": (vals.size - nk) / vals.size,
           "impervious_fraction": sum(c for n, c in known.items()
                                      if SURFACE.get(n) == "impervious") / nk,
           "water_fraction": sum(c for n, c in known.items() if SURFACE.get(n) == "water") / nk}
    out["pervious_fraction"] = 1 - out["impervious_fraction"] - out["water_fraction"]
    for i, k in enumerate(("C_low", "C_typical", "C_high")):
        out[k] = sum(c * COEF["six"][n][i] for n, c in known.items()) / nk
    if rain is not None:
        out["peak_flow_m3_s"] = out["C_typical"] * rain * area / 3.6e6
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return colour_checkpoint(tmp_path_factory.mktemp("ck") / "c.pt", "six")


def run(capsys, ckpt, images, out, *extra) -> tuple[int, str, str]:
    """launch/predict.py as a user types it (it hands GeoTIFFs and zones to segcore.gis)."""
    capsys.readouterr()  # what the test printed before (rasterio warnings) is not the run's
    rc = launcher.main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(out),
                        "--tile", "32", "--device", "cpu", "--no-progress",
                        *map(str, extra)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("how", ["alpha", "nodata"])
def test_class_raster_and_zones_exact(tmp_path, capsys, ckpt, how):
    """RGBA alpha or a nodata value as the mask; zones given in WGS84 (reprojected)."""
    mask = scene_mask()
    img = write_ortho(tmp_path / "ortho.tif", mask, how=how)
    zones = write_zones(tmp_path / "zones.geojson", crs="EPSG:4326", driver="GeoJSON")
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, ckpt, img, out, "--zones", zones, "--rain-mm-h", 40,
                          "--confidence")
    assert rc == 0, err
    want = expected_classes(mask)
    with rasterio.open(out / "ortho_classes.tif") as src:
        assert src.crs == rasterio.crs.CRS.from_user_input(CRS)
        assert src.transform == TRANSFORM
        assert src.nodata == 255 and src.dtypes[0] == "uint8"
        np.testing.assert_array_equal(src.read(1), want)
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        assert src.colormap(1)[1][:3] == tuple(SIX.colors[1])
        assert [src.tags(1)[f"CLASS_{k}"] for k in range(6)] == list(SIX.names)
    with rasterio.open(out / "ortho_confidence.tif") as src:
        conf = src.read(1)
        assert (conf[HOLE] == 255).all()
        inside = conf[want != 255]
        assert inside.min() >= 100 / 6 - 1 and inside.max() <= 100
    row = pd.read_csv(out / "rasters.csv").iloc[0]
    hand = by_hand(want)
    assert row["pixels"] == hand["pixels"] == H * W - 12 * 16
    assert row["nodata_pixels"] == 12 * 16
    assert row["surveyed_m2"] == pytest.approx(hand["pixels"] * PX * PX)
    for k in ("impervious_fraction", "water_fraction", "unknown_fraction", "C_typical"):
        assert row[k] == pytest.approx(hand[k], abs=1e-12), k
    z = pd.read_csv(out / "zones.csv").set_index("zone")
    assert list(z.index) == list(ZONES)
    for name, (r0, r1, c0, c1) in ZONES.items():
        area = (r1 - r0) * (c1 - c0) * PX * PX
        hz = by_hand(want[r0:r1, c0:c1], rain=40, area=area)
        assert z.loc[name, "area_m2"] == pytest.approx(area, rel=1e-6)
        assert z.loc[name, "pixels"] == hz["pixels"]
        assert z.loc[name, "coverage"] == pytest.approx(hz["pixels"] * PX * PX / area, rel=1e-6)
        for k in ("impervious_fraction", "pervious_fraction", "water_fraction",
                  "unknown_fraction", "C_low", "C_typical", "C_high"):
            assert z.loc[name, k] == pytest.approx(hz[k], abs=1e-12), (name, k)
        assert z.loc[name, "peak_flow_m3_s"] == pytest.approx(hz["peak_flow_m3_s"], rel=1e-6)
    gpkg = pyogrio.read_info(out / "zones.gpkg")
    assert gpkg["features"] == 3 and "peak_flow_m3_s" in list(gpkg["fields"])
    assert rasterio.crs.CRS.from_user_input(gpkg["crs"]) == rasterio.crs.CRS.from_user_input(CRS)
    assert pyogrio.read_info(out / "zones.geojson")["features"] == 3
    assert "zones: 3" in stdout and "40 mm/h" in stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_grid_cells_by_hand(tmp_path, capsys, ckpt):
    """--grid 8: cells aligned to multiples of 8 m; the HOLE's cell has fewer pixels."""
    mask = scene_mask(seed=2)
    img = write_ortho(tmp_path / "o.tif", mask, how="nodata")
    rc, _, err = run(capsys, ckpt, img, tmp_path / "out", "--grid", 8)
    assert rc == 0, err
    z = pd.read_csv(tmp_path / "out" / "zones.csv").set_index("zone")
    assert "peak_flow_m3_s" not in z.columns  # no --rain-mm-h
    # 32 m x 24 m at x 500000..500032, y 4999976..5000000: 4 x 3 cells of 16 x 16 px.
    assert len(z) == 12 and (z["area_m2"] == 64.0).all()
    want = expected_classes(mask)
    for r in range(3):
        for c in range(4):
            hz = by_hand(want[16 * r:16 * (r + 1), 16 * c:16 * (c + 1)])
            assert z.loc[f"{c}_{r}", "pixels"] == hz["pixels"]
            assert z.loc[f"{c}_{r}", "C_typical"] == pytest.approx(hz["C_typical"], abs=1e-12)
    assert z.loc["0_0", "pixels"] == 256 - 12 * 16


def test_plain_tiff_stays_a_photo_beside_a_geotiff(tmp_path, capsys, ckpt):
    """A TIFF without GeoTIFF tags and a PNG go through the ordinary folder run (PNGs,
    surface_stats.csv, shares of pixels); the GeoTIFF beside them through the GIS run."""
    mask = scene_mask(seed=3)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    write_ortho(imgs / "plain.tif", mask, how="none", crs=None)
    write_ortho(imgs / "geo.tif", mask, how="none")
    from PIL import Image

    with rasterio.open(imgs / "plain.tif") as s:
        Image.fromarray(s.read().transpose(1, 2, 0)).save(imgs / "photo.png")
    p = gis_cli.launcher_parser()
    base = ["--checkpoint", "c.pt", "--out", "o", "--images"]
    assert not gis_cli.wants_gis(p.parse_args([*base, str(imgs / "plain.tif")]))
    assert gis_cli.wants_gis(p.parse_args([*base, str(imgs)]))
    rc, stdout, err = run(capsys, ckpt, imgs, tmp_path / "out")
    assert rc == 0, err
    out = tmp_path / "out"
    photos = pd.read_csv(out / "surface_stats.csv").set_index("image")
    hand = by_hand(mask)
    for name in ("plain.tif", "photo.png"):
        assert photos.loc[name, "C_typical"] == pytest.approx(hand["C_typical"], abs=1e-12)
    assert (out / "plain_classes.png").exists() and not (out / "plain_classes.tif").exists()
    row = pd.read_csv(out / "rasters.csv").set_index("image").loc["geo.tif"]
    assert row["surveyed_m2"] == pytest.approx(H * W * PX * PX)
    assert row["C_typical"] == pytest.approx(hand["C_typical"], abs=1e-12)
    assert "1 raster(s) and 2 photo(s)" in stdout


def test_16_bit_source_is_stretched_by_the_stated_rule(tmp_path):
    """Per band 2-98 % percentiles of the valid pixels -> 0..255, clipped, rounded."""
    rng = np.random.default_rng(4)
    data = rng.integers(1000, 60000, size=(3, H, W)).astype(np.uint16)
    path = tmp_path / "s16.tif"
    with rasterio.open(path, "w", driver="GTiff", width=W, height=H, count=3,
                       dtype="uint16", crs=CRS, transform=TRANSFORM, nodata=0) as d:
        data[:, HOLE[0], HOLE[1]] = 0
        d.write(data)
    info = inspect_raster(path)
    valid = np.ones((H, W), bool)
    valid[HOLE] = False
    with rasterio.open(path) as src:
        rgb, ok = gis_raster.read_window(src, info, rasterio.windows.Window(0, 0, W, H))
    np.testing.assert_array_equal(ok, valid)
    for b in range(3):
        lo, hi = np.percentile(data[b][valid], [2, 98])
        want = np.clip(np.rint((data[b].astype(np.float32) - lo) * (255 / (hi - lo))), 0, 255)
        assert np.abs(rgb[..., b][valid].astype(int) - want[valid]).max() <= 1
        assert info.stretch[b] == (pytest.approx(lo), pytest.approx(hi))


def test_gdal_tools_read_the_outputs(tmp_path, capsys, ckpt):
    if not all(GDAL.values()):
        pytest.skip(f"gdalinfo/ogrinfo not on PATH ({GDAL}); apt-get install gdal-bin")
    img = write_ortho(tmp_path / "o.tif", scene_mask(), how="alpha")
    zones = write_zones(tmp_path / "z.gpkg")
    rc, _, err = run(capsys, ckpt, img, tmp_path / "out", "--zones", zones,
                     "--rain-mm-h", 25)
    assert rc == 0, err
    info = json.loads(subprocess.run([GDAL["gdalinfo"], "-json", str(tmp_path / "out" /
                                                                      "o_classes.tif")],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["geoTransform"] == list(TRANSFORM.to_gdal())
    assert 'ID["EPSG",32633]' in info["coordinateSystem"]["wkt"]
    band = info["bands"][0]
    assert band["noDataValue"] == 255 and band["type"] == "Byte"
    assert band["colorInterpretation"] == "Palette"
    assert band["categories"][:6] == list(SIX.names)
    assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    done = subprocess.run([GDAL["ogrinfo"], "-al", "-so", str(tmp_path / "out" / "zones.gpkg")],
                          capture_output=True, text=True, check=True)
    ogr = done.stdout
    assert "Warning" not in done.stderr, done.stderr
    assert "Feature Count: 3" in ogr and "peak_flow_m3_s: Real" in ogr
    assert 'ID["EPSG",32633]' in ogr


def test_cog_has_overviews(tmp_path):
    """A raster larger than the COG tile gets nearest-neighbour overviews."""
    path = write_ortho(tmp_path / "o.tif", scene_mask(), how="alpha")
    info = inspect_raster(path)
    model = TiledModel(oracle, SIX.num_classes, 32, 0.25, 4, torch.device("cpu"), None,
                       False, 0.5, 64.0)
    res = predict_raster(model, info, tmp_path, SIX.names, SIX.colors,
                         load_properties(None, "six"), blocksize=16)
    with rasterio.open(res.classes) as src:
        assert src.overviews(1) == [2, 4]
        assert src.block_shapes[0] == (16, 16)


# --------------------------------------------------------------------------- memory


def oracle(x: torch.Tensor) -> torch.Tensor:
    """One-hot logits decoding the red channel (as colour_checkpoint does), no weights."""
    from segcore.data.dataset import MEAN, STD

    red = torch.round((x[:, 0] * STD[0] + MEAN[0]) * 255)
    codes = torch.tensor([red_code(SIX, k) for k in range(SIX.num_classes)],
                         dtype=red.dtype)
    k = (red[:, None] - codes[None, :, None, None]).abs().argmin(dim=1)
    return torch.nn.functional.one_hot(k, SIX.num_classes).permute(0, 3, 1, 2).float()


def test_memory_is_bounded_by_the_tile_plan(tmp_path, monkeypatch):
    """A raster 32x larger than one block: every window read is one planned block, the
    numpy peak stays below one full-size RGB copy, and the map equals one whole-image
    blend (predict_classes)."""
    h, w = 64, 2048
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
    path = tmp_path / "long.tif"
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8",
                       crs=CRS, transform=TRANSFORM, tiled=True, blockxsize=64,
                       blockysize=64) as d:
        d.write(rgb.transpose(2, 0, 1))
    budget_mb = 32 * 64 * (4 * 7 + 4) / 2 ** 20  # about one 32 x 64 block
    blocks = plan_blocks(h, w, 32, 0.25, SIX.num_classes, budget_mb)
    bound = max((b.y1 - b.y0) * (b.x1 - b.x0) for b in blocks)
    assert len(blocks) >= 32 and bound * 32 <= h * w
    reads = []
    real = gis_raster.read_window

    def counting(src, info, window):
        reads.append(int(window.width) * int(window.height))
        return real(src, info, window)

    monkeypatch.setattr(gis_raster, "read_window", counting)
    model = TiledModel(oracle, SIX.num_classes, 32, 0.25, 4, torch.device("cpu"), None,
                       False, 0.5, budget_mb)
    info = inspect_raster(path)
    warm = inspect_raster(write_ortho(tmp_path / "warm.tif", scene_mask()))
    predict_raster(model, warm, tmp_path, SIX.names, SIX.colors, load_properties(None, "six"))
    reads.clear()  # imports and caches are warm: what is traced next is the raster's
    tracemalloc.start()
    res = predict_raster(model, info, tmp_path, SIX.names, SIX.colors,
                         load_properties(None, "six"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(reads) == len(blocks) and max(reads) == bound == res.max_window_pixels
    assert peak < h * w * 3, f"numpy peak {peak} B >= one full RGB copy {h * w * 3} B"
    whole = predict_classes(oracle, rgb, SIX.num_classes, tile=32, overlap=0.25,
                            max_block_mb=1e6)
    with rasterio.open(res.classes) as src:
        np.testing.assert_array_equal(src.read(1), whole)


# ------------------------------------------------------------------------ bad input


def one_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys, ckpt, monkeypatch):
    mask = scene_mask()
    good = write_ortho(tmp_path / "good.tif", mask)
    nocrs = write_ortho(tmp_path / "nocrs.tif", mask, crs=None)
    degrees = write_ortho(tmp_path / "degrees.tif", mask, crs="EPSG:4326",
                          transform=from_origin(15.0, 45.0, 1e-6, 1e-6))
    zones = write_zones(tmp_path / "z.gpkg")
    far = write_zones(tmp_path / "far.gpkg", zones={"x": (10000, 10010, 0, 10)})
    local = tmp_path / "local.gpkg"
    pyogrio.raw.write(local, np.array([shapely.to_wkb(shapely.box(0, 0, 5, 5))], object),
                      [np.array([1])], ["id"], driver="GPKG", geometry_type="Polygon",
                      crs='LOCAL_CS["site grid",UNIT["metre",1]]')
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\x00" + b"\x00" * 40)
    strip = tmp_path / "strip.tif"
    with rasterio.open(strip, "w", driver="GTiff", width=256, height=256, count=3,
                       dtype="uint8", crs=CRS, transform=TRANSFORM) as d:
        d.write(np.random.default_rng(0).integers(0, 255, (3, 256, 256)).astype(np.uint8))
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(strip.read_bytes()[:strip.stat().st_size // 2])
    two = tmp_path / "two.tif"
    with rasterio.open(two, "w", driver="GTiff", width=8, height=8, count=2,
                       dtype="uint8", crs=CRS, transform=TRANSFORM) as d:
        d.write(np.zeros((2, 8, 8), np.uint8))
    cases = {
        "no CRS, zones": (nocrs, ["--zones", zones], "no coordinate reference system"),
        "degrees, grid": (degrees, ["--grid", 5], "geographic CRS"),
        "untransformable": (good, ["--zones", local], "cannot be transformed"),
        "no overlap": (good, ["--zones", far], "overlaps"),
        "junk": (junk, [], "cannot be read"),
        "truncated": (truncated, [], "truncated or corrupt"),
        "two bands": (two, [], "2 band(s)"),
        "zones and grid": (good, ["--zones", zones, "--grid", 5], "not both"),
    }
    for name, (img, extra, needle) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        rc, _, err = run(capsys, ckpt, img, out, *extra)
        assert rc == 2, (name, err)
        assert needle in one_error(err), (name, err)
        assert nothing_written(out), (name, list(out.iterdir()))
    monkeypatch.setattr(gis_raster.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 5000, 5000))
    out = tmp_path / "out_full"
    rc, _, err = run(capsys, ckpt, good, out, "--grid", 5)
    assert rc == 2 and "not enough disk space" in one_error(err)
    assert nothing_written(out)


def test_missing_dependency_is_one_line(tmp_path, capsys, ckpt, monkeypatch):
    img = write_ortho(tmp_path / "o.tif", scene_mask())
    monkeypatch.setitem(sys.modules, "pyogrio", None)  # import pyogrio -> ImportError
    rc, _, err = run(capsys, ckpt, img, tmp_path / "out")
    assert rc == 2 and 'pip install "segbench[gis]"' in one_error(err)
    assert nothing_written(tmp_path / "out")


def test_wants_gis_and_idempotent_flags(tmp_path):
    p = gis_cli.launcher_parser()
    gis_cli.add_gis_arguments(p)  # as launch/predict.py will: no duplicate flags
    (tmp_path / "a.jpg").write_bytes(b"x")
    base = ["--checkpoint", "c.pt", "--out", "o", "--images"]
    assert not gis_cli.wants_gis(p.parse_args([*base, str(tmp_path)]))
    assert gis_cli.wants_gis(p.parse_args([*base, str(tmp_path), "--grid", "10"]))
    (tmp_path / "b.TIF").write_bytes(b"x")
    assert gis_cli.wants_gis(p.parse_args([*base, str(tmp_path)]))
    with pytest.raises(GisError, match="positive"):
        gis_cli._check_args(p.parse_args([*base, "x", "--rain-mm-h", "-3"]))
