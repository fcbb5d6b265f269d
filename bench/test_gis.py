"""GeoTIFF orthomosaic -> COG class raster and per-zone statistics (segcore.gis), in Mpx/s.

Raster: :func:`segcore.gis.raster.predict_raster` over a tiled, DEFLATE-compressed RGBA
GeoTIFF (1024 x 1536 on a CPU, 8192 x 8192 on CUDA) with a 1x1-convolution model, a
block budget that makes it read many windows (32 MiB), and a COG written at the end:
the time is the GIS path itself (windowed decode, masks, blending, windowed writes, the
COG copy with overviews), not a U-Net. Checked against one whole-image
:func:`segcore.predict.blocks.predict_classes` with the alpha hole set to nodata.

Zones: :func:`segcore.gis.zones.zone_rows` over that class raster with a 10 m grid
(0.05 m pixels: 200 x 200 pixels a cell), checked against a numpy count per cell.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

rasterio = pytest.importorskip("rasterio")
pytest.importorskip("shapely")
pytest.importorskip("pyogrio")

from rasterio.transform import from_origin  # noqa: E402

from segcore.data.classes import scheme  # noqa: E402
from segcore.gis.raster import TiledModel, inspect_raster, predict_raster  # noqa: E402
from segcore.gis.zones import grid_zones, zone_rows  # noqa: E402
from segcore.predict.blocks import predict_classes  # noqa: E402
from segcore.predict.flood import load_properties  # noqa: E402

from bench.conftest import BENCH_DEVICE, record, slowdown  # noqa: E402

SIX = scheme("six")
SHAPE = (8192, 8192) if BENCH_DEVICE.type == "cuda" else (1024, 1536)
TILE, BATCH, BUDGET_MB, PX = 256, 8, 32.0, 0.05
TRANSFORM = from_origin(500000.0, 5000000.0, PX, PX)


def _ortho(path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    h, w = SHAPE
    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = np.full((h, w), 255, np.uint8)
    alpha[: h // 8, : w // 8] = 0
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=4, dtype="uint8",
                       crs="EPSG:32633", transform=TRANSFORM, tiled=True, blockxsize=512,
                       blockysize=512, compress="deflate", photometric="RGB",
                       alpha="YES") as d:
        d.write(rgb.transpose(2, 0, 1), [1, 2, 3])
        d.write(alpha, 4)
    return path, rgb, alpha > 0


@pytest.fixture(scope="module")
def ortho(tmp_path_factory):
    return _ortho(tmp_path_factory.mktemp("gis") / "ortho.tif")


@pytest.fixture(scope="module")
def conv():
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, SIX.num_classes, 1).to(BENCH_DEVICE).eval()


def test_geotiff_to_cog(benchmark, ortho, conv, tmp_path):
    path, rgb, valid = ortho
    benchmark.group = f"GeoTIFF -> COG class raster {SHAPE[0]}x{SHAPE[1]}, tile {TILE}"
    model = TiledModel(conv, SIX.num_classes, TILE, 0.25, BATCH, BENCH_DEVICE, None, False,
                       0.5, BUDGET_MB)
    info = inspect_raster(path)
    table = load_properties(None, "six")

    def run():
        res = predict_raster(model, info, tmp_path, SIX.names, SIX.colors, table)
        slowdown()
        return res

    res = benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    want = predict_classes(conv, rgb, SIX.num_classes, tile=TILE, overlap=0.25,
                           batch_size=BATCH, device=BENCH_DEVICE, max_block_mb=1e6)
    want[~valid] = 255
    with rasterio.open(res.classes) as src:
        got = src.read(1)
        overviews = src.overviews(1)
    # A 1x1 conv's logits do not depend on the block (no context), so equal exactly.
    np.testing.assert_array_equal(got, want)
    assert overviews, "the COG has no overviews"
    record(benchmark, SHAPE[0] * SHAPE[1], unit="px", raster=list(SHAPE), tile=TILE,
           batch=BATCH, max_block_mb=BUDGET_MB, blocks=res.blocks,
           max_window_px=res.max_window_pixels)


def test_zone_statistics_grid(benchmark, ortho, conv, tmp_path):
    path, rgb, valid = ortho
    benchmark.group = f"zone statistics {SHAPE[0]}x{SHAPE[1]}, 10 m grid"
    model = TiledModel(conv, SIX.num_classes, TILE, 0.25, BATCH, BENCH_DEVICE, None, False,
                       0.5, 1e6)
    table = load_properties(None, "six")
    res = predict_raster(model, inspect_raster(path), tmp_path, SIX.names, SIX.colors, table)
    with rasterio.open(res.classes) as src:
        classes = src.read(1)
        bounds = tuple(src.bounds)
    zones = grid_zones(bounds, 10.0, rasterio.crs.CRS.from_epsg(32633))

    def run():
        rows = zone_rows(res.classes, zones, SIX.names, table, PX * PX, 50.0,
                         keep_empty=False)
        slowdown()
        return rows

    rows = benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    cell = int(round(10.0 / PX))
    first = classes[:cell, :cell]
    assert rows[0]["zone"] == "0_0" and rows[0]["pixels"] == int((first != 255).sum())
    assert sum(r["pixels"] for r in rows) == int(valid.sum())
    record(benchmark, SHAPE[0] * SHAPE[1], unit="px", zones=len(rows), cell_m=10.0,
           device="cpu")
