"""Input-pipeline throughput: the DALI loader vs the torch DataLoader, and prepare.

Loaders: 256x256 training crops (random crop + flips, normalized, on the bench device)
from a prepared cache at 1024 px (JPEG q90), the working resolution training reads. One
round = two epochs of the training split; a warm-up round first (pipeline build, worker
start, the torch loader's in-memory cache fill). Variants:

- ``dali``: the DALI pipeline (CPU decode here; ``mixed`` GPU decode on CUDA).
- ``torch-w0-cached``: what ``segcore.train.run`` builds on a CPU (no worker processes,
  decoded arrays kept in memory after the first epoch: no decode in the timed rounds).
- ``torch-w0`` / ``torch-w2``: the torch loader decoding every time, in the training
  process or in 2 worker processes (a dataset larger than host memory).
- ``torch-gpu-decode``: ``--decode gpu``: 2 workers read the JPEG bytes and the masks,
  nvJPEG decodes each batch on the device (CUDA with torchvision only; skipped here).

The torch variants are the training's loader: uint8 batches (``SegDataset(raw=True)``)
normalized on the bench device (``DeviceBatches``), persistent prefetching workers.

Every loader records its img/s per worker process (the training process counts as one
without workers) and ``loader_step_ratio``: its img/s over the img/s of the default
model's training step (modern, widths 16-128, fp32, channels-last) on the same crops
and batch, timed in the same session (median of 5 steps after 2 warm-up steps). Above 1
the loader alone outpaces the step; the training's own data wait is the sweep's
``data_wait_pct``, and its loader-only figure ``loader_img_s``.

Prepare: 6000x4000 JPEG + index PNG pairs (the Semantic Drone Dataset's size) to the
1024 px cache, 2 worker processes; and the decode step alone with and without the
reduced-scale JPEG decode (``Image.draft``) that prepare uses.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from segcore.config import ConfigError

from segcore.data.classes import scheme, write_class_csv
from segcore.data.dataset import DeviceBatches, SegDataset, make_train_loader
from segcore.data.layouts import discover
from segcore.data.prepare import load_resized_image, prepare

from bench.conftest import BENCH_DEVICE, record, slowdown, sync

CROP, BATCH, SCENES, EPOCHS = 256, 4, 24, 2
STEP_ROUNDS = 5  # timed training steps behind loader_step_ratio
BIG = (4000, 6000)  # (height, width) of a Semantic Drone Dataset photo
BIG_PAIRS = 3


def _scenes(root: Path, n: int, h: int, w: int) -> None:
    """Blocky class maps with textured colours: the fallback when the synthetic
    generator is not available."""
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, size=(24, 3), dtype=np.uint8)
    (root / "original_images").mkdir(parents=True)
    (root / "label_images_semantic").mkdir()
    for i in range(n):
        lab = rng.integers(0, 24, size=(h // 32 + 1, w // 32 + 1), dtype=np.uint8)
        mask = np.kron(lab, np.ones((32, 32), np.uint8))[:h, :w]
        image = palette[mask] + rng.integers(0, 24, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "original_images" / f"{i:03d}.jpg", quality=90)
        Image.fromarray(mask).save(root / "label_images_semantic" / f"{i:03d}.png")
    write_class_csv(root / "class_dict_seg.csv")


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("loaders")
    try:
        from segcore.data.synthetic import default_root, write_dataset
    except ImportError:
        src = tmp / "src"
        _scenes(src, SCENES, 683, 1024)
    else:  # the generator's own cache folder: generated once per machine, like run.py does
        src = write_dataset(default_root(SCENES, 683, 1024, 0), SCENES, 683, 1024, seed=0)
    out = tmp / "cache"
    prepare(src, out, size=1024, classes="six", quality=90, workers=2)
    return out


@pytest.fixture(scope="session")
def big_source(tmp_path_factory) -> Path:
    """BIG_PAIRS 6000x4000 pairs in the Kaggle layout (JPEG q95 + index PNG), made once."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    (root / "original_images").mkdir()
    (root / "label_images_semantic").mkdir()
    palette = rng.integers(0, 256, size=(24, 3), dtype=np.uint8)
    h, w = BIG
    # Texture keeps the JPEGs near real sizes (~13 MB): decode time follows entropy.
    noise = np.tile(rng.integers(0, 24, size=(1000, 1000, 3), dtype=np.uint8),
                    (h // 1000, w // 1000, 1))
    for i in range(BIG_PAIRS):
        lab = rng.integers(0, 24, size=(h // 100, w // 100), dtype=np.uint8)
        mask = np.asarray(Image.fromarray(lab).resize((w, h), Image.NEAREST))
        Image.fromarray(palette[mask] + noise).save(
            root / "original_images" / f"{i:03d}.jpg", quality=95)
        Image.fromarray(mask).save(root / "label_images_semantic" / f"{i:03d}.png")
    write_class_csv(root / "class_dict_seg.csv")
    # prepare fsyncs what it writes; on a journaling file system that can force out all
    # dirty pages, so flush the fixture's ~50 MB now rather than inside the first round.
    os.sync()
    return root


@pytest.fixture(scope="session")
def step_img_s() -> float:
    """The default model's training step on CROP x CROP crops, batch BATCH: img/s from
    the median of STEP_ROUNDS steps after 2 warm-up steps."""
    import time

    from segcore.config import ModelConfig, TrainConfig
    from segcore.model import build_model
    from segcore.train.engines.base import Engine
    from segcore.train.losses import segmentation_loss

    torch.manual_seed(0)
    model = build_model(ModelConfig(), 6).to(BENCH_DEVICE).to(memory_format=torch.channels_last)
    engine = Engine(model, TrainConfig(lr=1e-3, schedule="none"), BENCH_DEVICE,
                    total_steps=100)
    x = torch.randn(BATCH, 3, CROP, CROP, device=BENCH_DEVICE).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 6, (BATCH, CROP, CROP), device=BENCH_DEVICE)
    times = []
    for i in range(2 + STEP_ROUNDS):
        sync()
        t0 = time.perf_counter()
        engine.backward(segmentation_loss(engine.forward(x), y, binary=False))
        engine.step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return BATCH / float(np.median(times))


def _workers(kind: str) -> int:
    return 2 if kind in ("torch-w2", "torch-gpu-decode") else 0


def _make_loader(kind: str, cache: Path):
    idx = discover(cache)
    train, _ = idx.split(0.15, 0)
    six = scheme("six")
    if kind == "torch-gpu-decode":
        from segcore.data.gpu_loader import JpegCrops, make_gpu_decode_train_loader
        from segcore.data.nvjpeg import check_gpu_decode

        try:
            check_gpu_decode(BENCH_DEVICE)
        except ConfigError as e:
            pytest.skip(str(e))
        ds = JpegCrops(idx, train, six, (CROP, CROP), train=True, seed=0, raw=True)
        return make_gpu_decode_train_loader(ds, BATCH, 0, 1, seed=0, device=BENCH_DEVICE,
                                            num_workers=_workers(kind), pin_memory=True)
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
        from segcore.data.dali import make_dali_train_loader

        ctx = SimpleNamespace(rank=0, world_size=1, device=BENCH_DEVICE)
        return make_dali_train_loader(idx, train, six, (CROP, CROP), BATCH, ctx, seed=0,
                                      num_threads=2)
    workers = _workers(kind)
    ds = SegDataset(idx, train, six, (CROP, CROP), train=True, seed=0,
                    cache=kind == "torch-w0-cached", raw=True)
    return DeviceBatches(make_train_loader(ds, BATCH, 0, 1, seed=0, num_workers=workers,
                                           pin_memory=BENCH_DEVICE.type == "cuda"),
                         BENCH_DEVICE)


@pytest.mark.parametrize("kind", ["dali", "torch-w0-cached", "torch-w0", "torch-w2",
                                  "torch-gpu-decode"])
def test_loader_throughput(benchmark, bench_cache, step_img_s, kind):
    benchmark.group = f"loader {CROP}px crops b{BATCH} from a 1024 px cache"
    loader = _make_loader(kind, bench_cache)
    epoch = [0]

    def two_epochs() -> int:
        n = 0
        for _ in range(EPOCHS):
            loader.set_epoch(epoch[0])
            epoch[0] += 1
            for x, y in loader:
                x = x.to(BENCH_DEVICE, non_blocking=True)
                y = y.to(BENCH_DEVICE, non_blocking=True)
                n += x.shape[0]
        slowdown()
        sync()
        return n

    n = benchmark.pedantic(two_epochs, rounds=5, warmup_rounds=1, iterations=1)
    assert n == EPOCHS * len(loader) * BATCH
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    per_worker = ratio = None
    if stats is not None and stats.median:  # None under --benchmark-disable
        rate = n / stats.median
        workers = max(1, getattr(loader, "num_workers", 0) or 0)
        per_worker, ratio = rate / workers, rate / step_img_s
    record(benchmark, n, loader=kind, crop=CROP, batch=BATCH, images_per_round=n,
           rounds=5, cache_px=1024, workers=_workers(kind), img_s_per_worker=per_worker,
           step_img_s=step_img_s, step_rounds=STEP_ROUNDS, loader_step_ratio=ratio)
    # Stop worker processes and pipeline threads now: left to the garbage collector, a
    # DataLoader's worker shutdown (seconds) lands inside a later benchmark's timing.
    if hasattr(loader, "close"):
        loader.close()
    loader = two_epochs = None  # noqa: F841 (drops the last references now)
    gc.collect()


def test_prepare_throughput(benchmark, big_source, tmp_path):
    benchmark.group = "prepare 6000x4000 -> 1024 px"
    runs = iter(range(100))

    def fresh_out():  # a new folder per round: prepare must not find finished files
        return (big_source, tmp_path / f"out{next(runs)}"), {}

    def run(src, out):
        res = prepare(src, out, size=1024, classes="six", workers=2)
        slowdown()
        return res.written

    written = benchmark.pedantic(run, setup=fresh_out, rounds=3, warmup_rounds=0,
                                 iterations=1)
    assert written == BIG_PAIRS
    record(benchmark, BIG_PAIRS, source=f"{BIG[1]}x{BIG[0]}", size=1024, workers=2,
           pairs=BIG_PAIRS)


@pytest.mark.parametrize("draft", [True, False], ids=["draft", "full-decode"])
def test_prepare_image_decode(benchmark, big_source, draft):
    benchmark.group = "decode + resize one 6000x4000 JPEG to 1024 px"
    path = big_source / "original_images" / "000.jpg"

    def full(p):
        with Image.open(p) as im:
            return im.convert("RGB").resize((1024, 683), Image.Resampling.LANCZOS,
                                            reducing_gap=3.0)

    def decode():
        im = load_resized_image(path, 1024)[0] if draft else full(path)
        slowdown()
        return im.size

    size = benchmark.pedantic(decode, rounds=3, warmup_rounds=1, iterations=1)
    assert size == (1024, 683)
    record(benchmark, 1, draft=draft, source=f"{BIG[1]}x{BIG[0]}")
