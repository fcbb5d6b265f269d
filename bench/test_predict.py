"""Prediction end to end against the model alone, on the same tiles, in one run.

End to end: :func:`segcore.predict.folder.predict_folder` over a folder of photo-like
JPEGs (3 photos: 1024 x 1536 on a CPU, 4000 x 6000 on CUDA), with the launcher's
defaults (reader thread, writer pool of half the cores, class map + colour map +
overlay, PNG level 1), ``--decode gpu`` on CUDA when torchvision can decode there. Model only: the default
modern U-Net's forward over exactly the tiles that run sees, already normalized on the
device and batched as :func:`segcore.predict.tiles.blend_tiles` batches them; no decode,
no blend, no argmax, no files. Both are timed alternately (``bench/ratios.py``): the
ratio ``end-to-end time / model-only time`` is how much of prediction is not the model
(1.0: none; the goal of issue 22 is <= 2, i.e. end to end at >= 50 % of the model's
speed). It is printed, and stored in ``extra_info`` with both Mpx/s.

Under ``--benchmark-disable`` the photos are 256 x 384, so the check (every photo
predicted, the model-only pass over the same tile count) stays quick.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segcore.config import ModelConfig
from segcore.data.classes import scheme
from segcore.host import usable_cores
from segcore.model import build_model
from segcore.predict.blocks import plan_blocks, tile_normalizer
from segcore.predict.folder import PredictSettings, predict_folder
from segcore.predict.tiles import tile_grid

from bench.conftest import BENCH_DEVICE, record, slowdown, sync
from bench.ratios import PairedReference, record_ratio

CUDA = BENCH_DEVICE.type == "cuda"
PHOTOS = 3
PHOTO, TILE, BATCH = ((4000, 6000), 512, 8) if CUDA else ((1024, 1536), 256, 4)
PRECISION = "bf16" if CUDA else "fp32"
SCHEME = scheme("six")


def _gpu_decode() -> str:
    """``gpu`` where nvJPEG can be used, else ``cpu``."""
    if not CUDA:
        return "cpu"
    from segcore.config import ConfigError
    from segcore.data.nvjpeg import check_gpu_decode

    try:
        check_gpu_decode(BENCH_DEVICE)
        return "gpu"
    except ConfigError:
        return "cpu"


def _photos(folder: Path, size: tuple[int, int]) -> list[Path]:
    """Photo-like JPEGs: smooth colour regions with texture, quality 90."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    paths = []
    for i in range(PHOTOS):
        rng = np.random.default_rng(i)
        low = rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC))
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"photo{i}.jpg")
        Image.fromarray(img).save(paths[-1], quality=90)
    return paths


def _tiles_of(paths: list[Path]) -> torch.Tensor:
    """Every tile the folder run feeds the model (its block plan, its grid), as uint8
    ``[N, 3, t, t]`` on the device."""
    from segcore.data.images import read_image

    tiles = []
    for p in paths:
        img = torch.from_numpy(read_image(p)).permute(2, 0, 1)
        for b in plan_blocks(img.shape[1], img.shape[2], TILE, 0.25, SCHEME.num_classes,
                             1024.0):
            sub = img[:, b.y0:b.y1, b.x0:b.x1]
            tiles += [sub[:, y:y + TILE, x:x + TILE]
                      for y, x in tile_grid(b.y1 - b.y0, b.x1 - b.x0, TILE, 0.25)]
    return torch.stack(tiles).to(BENCH_DEVICE)


def test_predict_end_to_end_vs_model_only(benchmark, tmp_path):
    disabled = getattr(benchmark, "disabled", False)
    size = (256, 384) if disabled else PHOTO
    benchmark.group = f"prediction {PHOTOS} x {size[0]}x{size[1]} JPEG, tile {TILE}"
    paths = _photos(tmp_path / "photos", size)
    torch.manual_seed(0)
    cfg = ModelConfig()  # the default model
    model = build_model(cfg, SCHEME.num_classes).to(BENCH_DEVICE).eval()
    model = model.to(memory_format=torch.channels_last)
    decode = _gpu_decode()
    settings = PredictSettings(tile=TILE, overlap=0.25, batch_size=BATCH,
                               device=BENCH_DEVICE.type, precision=PRECISION,
                               threshold=0.5, channels_last=True, decode=decode,
                               writers=max(1, min(8, usable_cores() // 2)))
    tiles = _tiles_of(paths)
    normalize = tile_normalizer(BENCH_DEVICE)
    amp_dtype = {"bf16": torch.bfloat16}.get(PRECISION)
    runs = {"n": 0}

    def model_only() -> int:
        done = 0
        with torch.inference_mode(), torch.autocast(BENCH_DEVICE.type, dtype=amp_dtype,
                                                    enabled=amp_dtype is not None):
            for i in range(0, len(tiles), BATCH):
                x = normalize(tiles[i:i + BATCH]).contiguous(
                    memory_format=torch.channels_last)
                done += len(model(x))
        sync()
        return done

    def end_to_end():
        runs["n"] += 1
        res = predict_folder(model, SCHEME, paths, tmp_path / f"out{runs['n']}",
                             num_out_channels=SCHEME.num_classes, settings=settings,
                             device=BENCH_DEVICE)
        slowdown()
        return res

    ref = PairedReference(model_only)
    res = benchmark.pedantic(end_to_end, setup=ref.setup, rounds=1 if disabled else 3,
                             warmup_rounds=0 if disabled else 1, iterations=1)
    assert res.images_done == PHOTOS and not res.skipped
    assert res.timing.pixels == PHOTOS * size[0] * size[1]
    assert ref.last == len(tiles)  # the model-only pass saw every tile of the run
    mpx = res.timing.megapixels
    info = {"photos": PHOTOS, "photo": list(size), "tile": TILE, "batch": BATCH,
            "precision": PRECISION, "decode": decode, "tiles": len(tiles),
            "model": {"arch": cfg.arch, "widths": list(cfg.widths)},
            "stage_busy_s": res.timing.busy, "wall_s": res.timing.wall}
    ratio = record_ratio(benchmark, ref, "end to end / model only", "end-to-end",
                         "model-only")
    if ratio is not None:
        e2e_s = ratio["median"] * ratio["reference_median_s"]
        info.update(mpx_per_s_end_to_end=mpx / e2e_s,
                    mpx_per_s_model_only=mpx / ratio["reference_median_s"],
                    model_share_of_speed=1 / ratio["median"])
        print(f"\nprediction: end to end {mpx / e2e_s:.3g} Mpx/s, model only "
              f"{mpx / ratio['reference_median_s']:.3g} Mpx/s on the same {len(tiles)} "
              f"tiles: end to end takes {ratio['median']:.2f}x the model's time "
              f"({1 / ratio['median']:.0%} of its speed), median of {ratio['pairs']} "
              f"interleaved pairs; stages {', '.join(f'{k} {v:.2f} s' for k, v in res.timing.busy.items())} "
              f"busy, wall {res.timing.wall:.2f} s (last round)")
    record(benchmark, PHOTOS * size[0] * size[1], unit="px", **info)
