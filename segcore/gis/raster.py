"""A georeferenced orthomosaic -> a class raster, window by window, as a Cloud-Optimized GeoTIFF.

Reading
-------
:func:`inspect_raster` opens a GeoTIFF (or any raster GDAL reads) and checks what can
be predicted: 3 bands (RGB) or 4 with the fourth marked alpha (RGBA: the alpha is the
mask), of 8 or 16 bits. Anything else is refused with one line. The CRS and the pixel
size come from the file; a raster without them is predicted all the same, but its
results are shares of pixels, not square metres.

16-bit sources are scaled to 8 bits with one rule, fixed per raster before any pixel is
predicted: per band, a linear stretch from the 2nd to the 98th percentile of the valid
pixels of a decimated read (at most ``STRETCH_SAMPLE_SIDE`` pixels a side) to 0..255,
clipped. The same lo/hi apply to every window, so the result does not depend on the
window layout.

Valid pixels are GDAL's dataset mask (:meth:`rasterio.DatasetReader.dataset_mask`):
the nodata value, an alpha band or an internal mask. Pixels outside the survey are
neither pervious nor impervious: they get the class value :data:`NODATA` (255) and
count in no fraction.

Memory
------
:func:`predict_raster` predicts the raster in the blocks of
:func:`segcore.predict.blocks.plan_blocks` (runs of whole tiles of the global tile grid,
so the class map equals one whole-raster blend) and reads exactly one block's window at
a time: host and device memory are bounded by one block (``max_block_mb``) plus one
batch of tiles, whatever the raster's size. The kept part of each block's class map is
written into a tiled temporary GeoTIFF at once.

Writing
-------
The temporary raster is copied with GDAL's COG driver (DEFLATE, 512-pixel tiles,
nearest-neighbour overviews) to ``<stem>_classes.tif``: uint8 class indices, nodata
255, the input's CRS and transform, a colour table with the scheme's colours, the class
names as band metadata (``CLASS_<i>``) and as GDAL category names in the
``.aux.xml`` sidecar that QGIS and ``gdalinfo`` read. Everything is written under a
temporary name and renamed at the end, so an error leaves no half-written file; the free
space of the output folder is checked first against an upper bound of what the outputs
can take.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from xml.sax.saxutils import escape

import numpy as np

from segcore.gis import GisError

__all__ = ["NODATA", "STRETCH_SAMPLE_SIDE", "RasterInfo", "RasterResult", "inspect_raster",
           "read_window", "TiledModel", "predict_raster", "check_disk_space", "atomic_paths",
           "pixel_area_m2"]

NODATA = 255
CONFIDENCE_NODATA = 255
STRETCH_SAMPLE_SIDE = 1024
STRETCH_PERCENTILES = (2.0, 98.0)
COG_BLOCKSIZE = 512
GEOTIFF_EXTS = (".tif", ".tiff")


@dataclass
class RasterInfo:
    """What :func:`inspect_raster` found in a raster.

    Attributes:
        path: the file.
        width, height: size in pixels.
        bands: band count (3 or 4).
        dtype: ``uint8`` or ``uint16``.
        alpha: the fourth band is alpha (used as the mask).
        crs: a :class:`rasterio.crs.CRS`, or ``None``.
        transform: the affine pixel -> CRS transform, or ``None`` when not georeferenced.
        stretch: 16-bit sources: ``[(lo, hi)] * 3`` (see the module docstring).
    """

    path: Path
    width: int
    height: int
    bands: int
    dtype: str
    alpha: bool
    crs: Any
    transform: Any
    stretch: list[tuple[float, float]] | None = None

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None

    @property
    def pixel_area_m2(self) -> float | None:
        """Ground area of one pixel in m^2 (``None``: no CRS, or not in linear units)."""
        return pixel_area_m2(self.crs, self.transform)


@dataclass
class RasterResult:
    """What :func:`predict_raster` wrote.

    Attributes:
        classes: the ``<stem>_classes.tif`` path.
        confidence: the ``<stem>_confidence.tif`` path, or ``None``.
        stats: :func:`segcore.predict.flood.aggregate` of the surveyed pixels.
        nodata_pixels: pixels outside the survey.
        blocks: blocks predicted.
        max_window_pixels: the largest window read at once.
        files: every path written.
    """

    classes: Path
    confidence: Path | None
    stats: dict[str, Any]
    nodata_pixels: int
    blocks: int
    max_window_pixels: int
    files: list[Path] = field(default_factory=list)


def pixel_area_m2(crs: Any, transform: Any) -> float | None:
    """Area of one pixel in m^2 for a projected CRS (``None`` otherwise).

    Args:
        crs: a rasterio CRS or ``None``.
        transform: the raster's affine transform or ``None``.

    Returns:
        ``|det(transform)| * (metres per CRS unit)^2``, or ``None`` for no CRS or a
        geographic one (degrees are not a length).
    """
    if crs is None or transform is None or not crs.is_projected:
        return None
    _, factor = crs.linear_units_factor
    return abs(transform.a * transform.e - transform.b * transform.d) * factor ** 2


@contextlib.contextmanager
def open_raster(path: Path) -> Iterator[Any]:
    """``rasterio.open`` with GDAL's failures as one :class:`GisError` line."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    except (RasterioError, OSError) as e:
        raise GisError(f"{path}: cannot be read as a raster ({_first_line(e)}); is it a "
                       "complete GeoTIFF? Copy or export it again") from None
    with src:
        yield src


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def inspect_raster(path: str | Path) -> RasterInfo:
    """Open a raster, check its bands and type, and fix the 16-bit stretch.

    Args:
        path: a GeoTIFF (any raster GDAL reads).

    Returns:
        A :class:`RasterInfo`.

    Raises:
        GisError: unreadable or truncated file, a band count other than 3 (RGB) or 4
            (RGBA with band 4 marked alpha), a type other than uint8/uint16.
    """
    from rasterio.enums import ColorInterp

    path = Path(path)
    with open_raster(path) as src:
        count, dtype = src.count, src.dtypes[0]
        alpha = count == 4 and src.colorinterp[3] == ColorInterp.alpha
        if count not in (3, 4) or (count == 4 and not alpha):
            what = ("band 4 is not marked alpha" if count == 4 else f"{count} band(s)")
            raise GisError(f"{path}: {what}; prediction needs RGB (3 bands) or RGBA (4, "
                           "the fourth marked alpha), e.g. gdal_translate -b 1 -b 2 -b 3 "
                           "in.tif rgb.tif")
        if dtype not in ("uint8", "uint16") or len(set(src.dtypes[:3])) != 1:
            raise GisError(f"{path}: bands of type {', '.join(src.dtypes)}; prediction "
                           "needs 8-bit or 16-bit unsigned RGB; convert with gdal_translate "
                           "-ot Byte -scale")
        georef = src.crs is not None and not src.transform.is_identity
        info = RasterInfo(path, src.width, src.height, count, dtype, alpha,
                          src.crs if georef else None, src.transform if georef else None)
        if dtype == "uint16":
            info.stretch = _stretch_limits(src)
    return info


def _stretch_limits(src: Any) -> list[tuple[float, float]]:
    """Per-band 2-98 % percentiles of the valid pixels of a decimated read."""
    from rasterio.enums import Resampling

    scale = max(src.width, src.height) / STRETCH_SAMPLE_SIDE
    shape = ((max(1, round(src.height / scale)), max(1, round(src.width / scale)))
             if scale > 1 else (src.height, src.width))
    try:
        data = src.read([1, 2, 3], out_shape=(3, *shape), resampling=Resampling.nearest)
        valid = src.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
    except Exception as e:  # rasterio raises RasterioIOError and others for bad blocks
        raise GisError(f"{src.name}: cannot be read ({_first_line(e)}); is it a complete "
                       "GeoTIFF? Copy or export it again") from None
    if not valid.any():
        raise GisError(f"{src.name}: every pixel is nodata or transparent; nothing to "
                       "predict")
    limits = []
    for band in data:
        lo, hi = np.percentile(band[valid], STRETCH_PERCENTILES)
        limits.append((float(lo), float(max(hi, lo + 1.0))))
    return limits


def read_window(src: Any, info: RasterInfo, window: Any) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 pixels and the valid mask of one window.

    Args:
        src: the open dataset.
        info: its :class:`RasterInfo` (band layout, stretch).
        window: a :class:`rasterio.windows.Window`.

    Returns:
        ``(rgb (h, w, 3) uint8, valid (h, w) bool)``.

    Raises:
        GisError: GDAL cannot decode the window (a truncated or corrupt file).
    """
    try:
        data = src.read([1, 2, 3], window=window)
        valid = src.dataset_mask(window=window) > 0
    except Exception as e:  # RasterioIOError, CPLE_AppDefinedError, ...: one line
        raise GisError(f"{info.path}: cannot be read at rows {window.row_off}.."
                       f"{window.row_off + window.height} ({_first_line(e)}); the file is "
                       "truncated or corrupt; copy or export it again") from None
    if info.stretch is not None:
        out = np.empty(data.shape, np.uint8)
        for b, (lo, hi) in enumerate(info.stretch):
            scaled = (data[b].astype(np.float32) - lo) * (255.0 / (hi - lo))
            np.clip(np.rint(scaled, out=scaled), 0, 255, out=scaled)
            out[b] = scaled
        data = out
    return np.ascontiguousarray(data.transpose(1, 2, 0)), valid


def check_disk_space(out: Path, info: RasterInfo, confidence: bool) -> None:
    """Refuse before writing when the output folder cannot hold the outputs.

    The bound: per output raster, an uncompressed temporary copy plus a COG as large as
    uncompressed with its overviews (4/3), one byte a pixel each.

    Raises:
        GisError: less free space than the bound.
    """
    need = int(info.pixels * (1 + 4 / 3) * (2 if confidence else 1)) + (1 << 20)
    free = shutil.disk_usage(out).free
    if free < need:
        raise GisError(f"not enough disk space in {out} for the outputs of {info.path.name} "
                       f"({info.width} x {info.height} px): up to {need / 1e9:.2f} GB "
                       f"needed, {free / 1e9:.2f} GB free; free space or choose another "
                       "--out")


@contextlib.contextmanager
def atomic_paths(*finals: Path) -> Iterator[list[Path]]:
    """Temporary names beside ``finals``, renamed onto them only if the block succeeds.

    Yields:
        One temporary path per final path (same folder, hidden, same suffix). On an
        exception they are removed and nothing is renamed.
    """
    temps = [p.with_name(f".{p.stem}.part{os.getpid()}{p.suffix}") for p in finals]
    try:
        yield temps
        for t, p in zip(temps, finals):
            if t.exists():
                os.replace(t, p)
    finally:
        for t in temps:
            for leftover in (t, t.with_name(t.name + ".aux.xml")):
                leftover.unlink(missing_ok=True)


def _profile(info: RasterInfo, nodata: int) -> dict[str, Any]:
    prof = {"driver": "GTiff", "width": info.width, "height": info.height, "count": 1,
            "dtype": "uint8", "nodata": nodata, "tiled": True, "blockxsize": 256,
            "blockysize": 256, "BIGTIFF": "IF_SAFER"}
    if info.georeferenced:
        prof.update(crs=info.crs, transform=info.transform)
    return prof


def _aux_xml(names: Sequence[str]) -> str:
    cats = "".join(f"<Category>{escape(n)}</Category>" for n in names)
    return (f'<PAMDataset><PAMRasterBand band="1"><CategoryNames>{cats}</CategoryNames>'
            "</PAMRasterBand></PAMDataset>\n")


def _to_cog(tmp: Path, part: Path, blocksize: int) -> None:
    import rasterio.shutil

    rasterio.shutil.copy(tmp, part, driver="COG", COMPRESS="DEFLATE",
                         BLOCKSIZE=str(blocksize), OVERVIEW_RESAMPLING="NEAREST",
                         BIGTIFF="IF_SAFER")


@dataclass
class TiledModel:
    """How tiles go through the model (the tiling part of PredictSettings)."""

    fn: Callable
    num_out_channels: int
    tile: int
    overlap: float
    batch_size: int
    device: Any
    autocast_dtype: Any
    channels_last: bool
    threshold: float
    max_block_mb: float


def _predict_block(m: TiledModel, rgb: np.ndarray, b: Any, normalize: Callable,
                   confidence: bool, progress: Callable | None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Classes (and confidence) of a block's kept region; see predict_classes."""
    import torch

    from segcore.predict.tiles import blend_tiles, logits_to_classes, tile_grid

    expect = tile_grid(b.y1 - b.y0, b.x1 - b.x0, m.tile, m.overlap)
    if len(expect) != b.tiles:  # the block must reproduce the global grid exactly
        raise RuntimeError(f"internal: block {b} tiles {len(expect)} != {b.tiles}")
    sub = torch.from_numpy(rgb).to(m.device).permute(2, 0, 1)
    logits = blend_tiles(m.fn, sub, m.num_out_channels, tile=m.tile, overlap=m.overlap,
                         batch_size=m.batch_size, device=m.device,
                         autocast_dtype=m.autocast_dtype, channels_last=m.channels_last,
                         progress=progress, transform=normalize)
    del sub
    keep = logits[:, b.ky0 - b.y0:b.ky1 - b.y0, b.kx0 - b.x0:b.kx1 - b.x0]
    classes = logits_to_classes(keep, m.threshold).cpu().numpy()
    conf = None
    if confidence:
        if m.num_out_channels == 1:
            p = torch.sigmoid(keep[0])
            top = torch.maximum(p, 1 - p)
        else:
            top = torch.softmax(keep, dim=0).amax(dim=0)
        conf = torch.round(top * 100).to(torch.uint8).cpu().numpy()
    return classes, conf


def predict_raster(model: TiledModel, info: RasterInfo, out: Path, names: Sequence[str],
                   colors: Sequence[Sequence[int]], table: Any, *, confidence: bool = False,
                   progress: Callable[[int, int], None] | None = None,
                   blocksize: int = COG_BLOCKSIZE) -> RasterResult:
    """Predict a raster block by block and write its class raster (and confidence).

    Args:
        model: the model and its tiling settings.
        info: from :func:`inspect_raster`.
        out: output folder (exists).
        names: class names in index order.
        colors: RGB colour per class (the colour table).
        table: the :class:`segcore.predict.flood.PropertyTable` for the statistics.
        confidence: also write ``<stem>_confidence.tif`` (uint8: the winning class's
            probability in percent, 0..100; nodata 255).
        progress: ``(tiles_done, tiles_total)`` over the raster.
        blocksize: COG tile side.

    Returns:
        A :class:`RasterResult`.

    Raises:
        GisError: not enough disk space, or a window GDAL cannot decode (nothing is left
            behind: temporaries are removed).
    """
    from rasterio.windows import Window

    from segcore.predict.blocks import plan_blocks, tile_normalizer
    from segcore.predict.flood import aggregate, surface_stats

    check_disk_space(out, info, confidence)
    blocks = plan_blocks(info.height, info.width, model.tile, model.overlap,
                         model.num_out_channels, model.max_block_mb)
    total = sum(b.tiles for b in blocks)
    normalize = tile_normalizer(model.device)
    stem = info.path.stem
    finals = [out / f"{stem}_classes.tif"] + ([out / f"{stem}_confidence.tif"]
                                              if confidence else [])
    tmps = [out / f".{stem}_classes.tmp{os.getpid()}.tif",
            out / f".{stem}_confidence.tmp{os.getpid()}.tif"][:len(finals)]
    stats, nodata, done, largest = None, 0, 0, 0
    try:
        with atomic_paths(*finals) as parts, open_raster(info.path) as src, \
                contextlib.ExitStack() as stack:
            import rasterio

            from rasterio.errors import NotGeoreferencedWarning

            with warnings.catch_warnings():  # a photo without CRS is written as such
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                dsts = [stack.enter_context(rasterio.open(t, "w", **_profile(info, nd)))
                        for t, nd in zip(tmps, (NODATA, CONFIDENCE_NODATA))]
            for b in blocks:
                window = Window(b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0)
                rgb, valid = read_window(src, info, window)
                largest = max(largest, rgb.shape[0] * rgb.shape[1])
                step = (None if progress is None
                        else (lambda d, _t, base=done: progress(base + d, total)))
                classes, conf = _predict_block(model, rgb, b, normalize, confidence, step)
                del rgb
                kept = valid[b.ky0 - b.y0:b.ky1 - b.y0, b.kx0 - b.x0:b.kx1 - b.x0]
                classes[~kept] = NODATA
                nodata += int(kept.size - np.count_nonzero(kept))
                part = surface_stats(classes[kept], names, table, ignore_index=None)
                # Folded at once (pixel counts summed): memory does not grow with blocks.
                stats = part if stats is None else aggregate([stats, part])
                kwin = Window(b.kx0, b.ky0, b.kx1 - b.kx0, b.ky1 - b.ky0)
                dsts[0].write(classes, 1, window=kwin)
                if conf is not None:
                    conf[~kept] = CONFIDENCE_NODATA
                    dsts[1].write(conf, 1, window=kwin)
                done += b.tiles
            _finish_metadata(dsts, names, colors)
            stack.close()
            for t, p in zip(tmps, parts):
                _to_cog(t, p, blocksize)
        aux = finals[0].with_name(finals[0].name + ".aux.xml")
        with atomic_paths(aux) as (part,):
            part.write_text(_aux_xml(names))
    finally:
        for t in tmps:
            t.unlink(missing_ok=True)
    return RasterResult(finals[0], finals[1] if confidence else None, stats,
                        nodata, len(blocks), largest, [*finals, aux])


def _finish_metadata(dsts: list[Any], names: Sequence[str],
                     colors: Sequence[Sequence[int]]) -> None:
    """Colour table, band description and class names of the class raster."""
    cls = dsts[0]
    cmap = {i: (*map(int, colors[i]), 255) for i in range(len(names))}
    cmap[NODATA] = (0, 0, 0, 0)
    cls.write_colormap(1, cmap)
    cls.set_band_description(1, "class")
    cls.update_tags(1, **{f"CLASS_{i}": n for i, n in enumerate(names)})
    cls.update_tags(CLASS_NAMES=",".join(names), NODATA_MEANING="outside the survey")
    if len(dsts) > 1:
        dsts[1].set_band_description(1, "confidence_percent")
        dsts[1].update_tags(1, UNITS="percent", MEANING="probability of the predicted class")
