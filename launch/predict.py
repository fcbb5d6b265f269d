"""Full-resolution prediction over a folder of drone photos, with flood-risk outputs.

    python launch/predict.py --checkpoint runs/six/checkpoint.pt --images photos/ --out pred/
    python launch/predict.py --checkpoint CKPT --images DIR --out DIR --truth MASKS/ \\
        --properties my_drainage_manual.toml --precision bf16

Writes to --out, per image: <stem>_classes.png (class indices), <stem>_color.png,
<stem>_overlay.jpg (--figures chooses); for the folder: surface_stats.csv / .json (one
row per image and an area-weighted ALL row: impervious fraction, runoff coefficient C
low/typical/high, unknown share, class fractions; with --truth also truth values and
errors), summary.png and timing.json (busy seconds per stage, wall time, Mpx/s).
Georeferenced GeoTIFF orthomosaics (or --zones / --grid) give <stem>_classes.tif, a
Cloud-Optimized GeoTIFF in the input's CRS, and with --zones / --grid per-zone
statistics in m^2 with the rational-method peak flow: zones.gpkg / .geojson / .csv
(docs/GIS.md).
Decoding, inference and writing overlap (docs/PREDICTION.md). Exit status: 0 done (some images may have been skipped: see the summary),
1 every image failed, 2 bad arguments or inputs, 3 out of memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segcore.faults import is_oom  # noqa: E402
from segcore.gis.cli import add_gis_arguments, run_gis, wants_gis  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run")
    p.add_argument("--images", required=True, help="folder of photos (or one photo)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--truth", help="folder of truth masks <image stem>.png")
    p.add_argument("--truth-kind", choices=("target", "sdd"), default="target",
                   help="truth values: indices of the checkpoint's class scheme (target, "
                        "default) or 24-class SDD labels remapped like training (sdd)")
    p.add_argument("--properties", help="TOML overriding surface kinds / runoff "
                                        "coefficients (see segcore/predict/flood.py)")
    p.add_argument("--tile", type=int, default=512, help="tile side in pixels (512)")
    p.add_argument("--overlap", type=float, default=0.25,
                   help="fraction of a tile shared with its neighbour (0.25)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (4)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype (fp16 on CUDA only)")
    p.add_argument("--threshold", type=float, default=None,
                   help="binary schemes: paved-area where sigmoid(logit) > threshold "
                        "(default: 0.5, the checkpoint's fixed rule; a checkpoint trained "
                        "with --pred-threshold median|mean needs it given)")
    p.add_argument("--max-block-mb", type=float, default=1024.0,
                   help="memory for one block of the image's accumulator (MiB, 1024)")
    p.add_argument("--overlay-max-side", type=int, default=2048,
                   help="downscale overlays to this long side (0: full size)")
    p.add_argument("--max-image-pixels", type=int, default=400_000_000,
                   help="skip larger images (decompression-bomb guard)")
    p.add_argument("--decode", choices=("cpu", "gpu"), default="cpu",
                   help="JPEG decode: cpu (PIL, default) or gpu (nvJPEG through "
                        "torchvision, on the CUDA device)")
    p.add_argument("--figures", choices=("all", "color", "overlay", "none"), default="all",
                   help="files besides the class map: colour map and overlay (all), one "
                        "of them, or none (fastest)")
    p.add_argument("--prefetch", type=int, default=1,
                   help="photos decoded ahead of the model besides the one being decoded "
                        "(1; 0: no reader thread)")
    p.add_argument("--writers", type=int, default=None,
                   help="threads writing outputs, and photos written at a time (default "
                        "half the cores, 1-8; 0: write in the model's thread)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_gis_arguments(p)  # GeoTIFF orthomosaics, --zones, --grid (segcore/gis, docs/GIS.md)
    return p


class _Bars:
    """Two tqdm bars on stderr: images, and tiles of the current image."""

    def __init__(self, enabled: bool) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm
        self.enabled = enabled
        self.images = None
        self.tiles = None

    def log(self, msg: str) -> None:
        self.tqdm.write(msg, file=sys.stderr)

    def _images_bar(self, total: int) -> None:
        if self.images is None:
            self.images = self.tqdm(total=total, unit="img", desc="images", position=0,
                                    file=sys.stderr, dynamic_ncols=True)

    def image_started(self, index: int, total: int, name: str, tiles: int) -> None:
        if not self.enabled:
            return
        self._images_bar(total)
        if self.tiles is None:
            self.tiles = self.tqdm(total=tiles, unit="tile", desc=name, position=1,
                                   leave=False, file=sys.stderr, dynamic_ncols=True)
        else:
            self.tiles.reset(total=tiles)
            self.tiles.set_description(name)

    def tiles_done(self, done: int, total: int) -> None:
        if self.tiles is not None:
            self.tiles.n = done
            self.tiles.refresh()

    def image_finished(self, index: int, total: int, row) -> None:
        if self.enabled:
            self._images_bar(total)
            self.images.update()

    def close(self) -> None:
        for bar in (self.tiles, self.images):
            if bar is not None:
                bar.close()


def _writers(n: int | None) -> int:
    """--writers, default half the usable cores, 1 to 8 (the model's thread, the
    reader and the launch of kernels keep the rest)."""
    from segcore.host import usable_cores

    return max(1, min(8, usable_cores() // 2)) if n is None else n


def _write_timing(res, settings, total_s: float) -> None:
    """timing.json in --out: the run's stage times and Mpx/s, and what they were made with."""
    from segcore.io import write_json_atomic

    s = settings.to_dict()
    write_json_atomic(res.out / "timing.json", res.timing.to_dict(
        total_s=round(total_s, 4),
        **{k: s[k] for k in ("decode", "prefetch", "writers", "figures", "precision",
                             "tile", "batch_size")}))


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None or v != v else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from segcore.config import ConfigError
    from segcore.predict import PredictError
    from segcore.predict.folder import Hooks, PredictSettings, predict_checkpoint

    bars = _Bars(enabled=not a.no_progress)
    try:
        settings = PredictSettings(
            tile=a.tile, overlap=a.overlap, batch_size=a.batch_size, device=a.device,
            precision=a.precision, threshold=a.threshold, max_block_mb=a.max_block_mb,
            overlay_max_side=a.overlay_max_side, max_image_pixels=a.max_image_pixels,
            decode=a.decode, figures=a.figures, prefetch=a.prefetch,
            writers=_writers(a.writers))
        if a.device != "cpu":
            import torch

            if torch.cuda.is_available():
                # Fixed tile shapes: let cuDNN pick its fastest kernels once.
                torch.backends.cudnn.benchmark = True
        hooks = Hooks(log=bars.log, image_started=bars.image_started,
                      tiles_done=bars.tiles_done, image_finished=bars.image_finished)
        if wants_gis(a):  # GeoTIFFs, --zones, --grid: segcore/gis prints its own summary
            rc = run_gis(a, settings, hooks)
            bars.close()
            return rc
        t0 = time.perf_counter()
        res = predict_checkpoint(a.checkpoint, a.images, a.out, settings=settings,
                                 truth=a.truth, truth_kind=a.truth_kind,
                                 properties=a.properties, hooks=hooks)
        _write_timing(res, settings, time.perf_counter() - t0)
    except (PredictError, ConfigError, OSError) as e:  # OSError: e.g. --out not writable
        bars.close()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        bars.close()
        if is_oom(e):
            print(f"error: out of memory: {str(e).splitlines()[0] if str(e) else e}. Lower "
                  "--batch-size, --tile or --max-block-mb, or use --precision bf16",
                  file=sys.stderr, flush=True)
            return 3
        raise
    bars.close()
    n_skip = len(res.skipped)
    if res.all_row is None:
        print(f"error: none of the {n_skip} image(s) could be read (see the lines above); "
              f"nothing predicted, details in {res.out / 'surface_stats.json'}",
              file=sys.stderr, flush=True)
        return 1
    r = res.all_row
    print(f"predicted {res.images_done} image(s)"
          + (f", {n_skip} skipped (unreadable, listed above)" if n_skip else "")
          + f" -> {res.out}/surface_stats.csv")
    print(f"ALL (area-weighted): impervious {_fmt(r['impervious_fraction'], '.1%')}, "
          f"water {_fmt(r['water_fraction'], '.1%')} of classified ground; unknown "
          f"{_fmt(r['unknown_fraction'], '.1%')} of pixels; runoff coefficient C "
          f"{_fmt(r['C_typical'], '.3f')} (low {_fmt(r['C_low'], '.3f')}, high "
          f"{_fmt(r['C_high'], '.3f')})"
          + (f"; vs truth: impervious error {_fmt(r['impervious_fraction_err'], '+.3f')}, "
             f"C error {_fmt(r['C_typical_err'], '+.3f')}, pixel accuracy "
             f"{_fmt(r['pixel_accuracy'], '.3f')}" if "pixel_accuracy" in r else ""),
          flush=True)
    print(res.timing.line(), flush=True)
    return 0


def tune_malloc(threshold: int = 192 << 20) -> bool:
    """Keep freed activation-sized blocks in glibc's heap instead of returning them.

    Every forward pass allocates and frees tens of MB of activations; by default glibc
    serves those with mmap/munmap, so each batch page-faults its memory in again. On the
    2-core reference VM (one 6000x4000 photo, default modern U-Net, fp32) that was 23 s
    of system time out of 89 s of CPU, 90 s wall; with a 192 MB threshold: 7 s system,
    42 s wall, peak RSS 2.2 GB instead of 1.9 GB, flat over a folder (6 photos: 2.1 GB).
    Blocks above the threshold (the per-image accumulators) still go back to the OS, so
    a long folder cannot fragment the heap upward (1 GB did: 3.3 GB after 3 photos).
    Process-wide, so only the command-line entry point calls it.

    Returns:
        whether the setting was applied (glibc only).
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, threshold)
                    and libc.mallopt(m_trim_threshold, threshold))
    except (OSError, AttributeError):  # musl or no libc symbol: keep the defaults
        return False


if __name__ == "__main__":
    tune_malloc()
    sys.exit(main())
