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

The torch variants are the training's loader: uint8 batches (``SegDataset(raw=True)``)
normalized on the bench device (``DeviceBatches``), persistent prefetching workers.

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
from PIL import Image

from segcore.data.classes import scheme, write_class_csv
from segcore.data.dataset import DeviceBatches, SegDataset, make_train_loader
from segcore.data.layouts import discover
from segcore.data.prepare import load_resized_image, prepare

from bench.conftest import BENCH_DEVICE, record, slowdown, sync

CROP, BATCH, SCENES, EPOCHS = 256, 4, 24, 2
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


def _make_loader(kind: str, cache: Path):
    idx = discover(cache)
    train, _ = idx.split(0.15, 0)
    six = scheme("six")
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
        from segcore.data.dali import make_dali_train_loader

        ctx = SimpleNamespace(rank=0, world_size=1, device=BENCH_DEVICE)
        return make_dali_train_loader(idx, train, six, (CROP, CROP), BATCH, ctx, seed=0,
                                      num_threads=2)
    workers = 2 if kind == "torch-w2" else 0
    ds = SegDataset(idx, train, six, (CROP, CROP), train=True, seed=0,
                    cache=kind == "torch-w0-cached", raw=True)
    return DeviceBatches(make_train_loader(ds, BATCH, 0, 1, seed=0, num_workers=workers,
                                           pin_memory=BENCH_DEVICE.type == "cuda"),
                         BENCH_DEVICE)


@pytest.mark.parametrize("kind", ["dali", "torch-w0-cached", "torch-w0", "torch-w2"])
def test_loader_throughput(benchmark, bench_cache, kind):
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
    record(benchmark, n, loader=kind, crop=CROP, batch=BATCH, images_per_round=n,
           cache_px=1024)
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
