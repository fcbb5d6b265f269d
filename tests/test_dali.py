"""The DALI training loader (CPU pipeline here: device_id=None, no mixed/gpu operators)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("nvidia.dali")

from segcore.config import ConfigError  # noqa: E402
from segcore.data import dali as dali_mod  # noqa: E402
from segcore.data.classes import scheme  # noqa: E402
from segcore.data.dali import make_dali_train_loader  # noqa: E402
from segcore.data.dataset import MEAN, STD, SegDataset, make_train_loader  # noqa: E402
from segcore.data.layouts import DatasetError, discover  # noqa: E402
from segcore.data.prepare import prepare  # noqa: E402

from conftest import write_layout  # noqa: E402

CPU = torch.device("cpu")


def ctx(rank=0, world=1):
    return SimpleNamespace(rank=rank, world_size=world, device=CPU)


def channel(x: torch.Tensor, c: int) -> torch.Tensor:
    """Undo the normalization of channel ``c`` of a [B, 3, H, W] batch: uint8 codes."""
    return torch.round((x[:, c] * STD[c] + MEAN[c]) * 255).long()


def misaligned(x: torch.Tensor, y: torch.Tensor) -> int:
    """Samples of a batch whose mask is not the one the image encodes (red = 10 x label)."""
    return int((channel(x, 0) != y * 10).flatten(1).any(1).sum())


@pytest.mark.parametrize("crop,workers", [((32, 32), 0), ((56, 40), 0), ((32, 32), 2)],
                         ids=["crop", "pad", "crop-2workers"])
def test_same_batches_as_the_torch_loader(coded_dataset, crop, workers):
    """Interchangeable: same shard order, crops, flips, normalization and padding (the
    56-row crop is taller than the 48-row images: reflect padding, ignore-index mask),
    in every epoch, also when the torch loader's worker processes draw the crops."""
    idx = discover(coded_dataset)
    six = scheme("six")
    for rank in (0, 1):
        dl = make_dali_train_loader(idx, idx.samples, six, crop, 2, ctx(rank, 2), seed=3)
        ds = SegDataset(idx, idx.samples, six, crop, train=True, seed=3)
        tl = make_train_loader(ds, 2, rank, 2, seed=3, num_workers=workers)
        assert len(dl) == len(tl) == 3 and dl.decoded == (crop[0] > 48)
        for epoch in (0, 1):
            dl.set_epoch(epoch)
            tl.sampler.set_epoch(epoch)
            ds.set_epoch(epoch)
            n = 0
            for (xa, ya), (xb, yb) in zip(dl, tl):
                assert xa.shape == xb.shape == (2, 3, *crop) and xa.dtype == torch.float32
                assert xa.is_contiguous(memory_format=torch.channels_last)
                assert ya.dtype == torch.int64 and ya.shape == (2, *crop)
                assert xa.device == ya.device == CPU
                assert torch.equal(ya, yb)
                torch.testing.assert_close(xa, xb, atol=1e-5, rtol=0)
                n += 1
            assert n == 3
        if crop[0] > 48:
            assert (ya == 255).any()  # padded rows are ignored by the loss


def test_mask_stays_aligned_over_many_draws(coded_dataset):
    idx = discover(coded_dataset)
    dl = make_dali_train_loader(idx, idx.samples, scheme("full"), (24, 40), 4, ctx(), seed=0)
    hflips, vflips, windows = set(), set(), set()
    for epoch in range(10):  # 10 epochs x 12 samples = 120 independent draws
        dl.set_epoch(epoch)
        for x, y in dl:
            assert misaligned(x, y) == 0
            g = channel(x, 1)  # green = 3 x source column: gives the flip and the window
            hflips.update((g[:, 0, 0] > g[:, 0, -1]).tolist())
            windows.update(g[:, 0].min(1).values.tolist())
            # blue = 3 x source row in coded_pair
            b = channel(x, 2)
            vflips.update((b[:, 0, 0] > b[:, -1, 0]).tolist())
    assert hflips == {True, False} and vflips == {True, False}
    assert len(windows) > 5  # the crop window moves


class _OneSided:
    """Wraps ``nvidia.dali.fn`` so that one augmentation reaches the image but not the
    mask (the 2nd call of an operator is the mask's): the negative control."""

    def __init__(self, fn, what):
        self._fn, self._what, self._calls = fn, what, {}
        if what == "crop":
            self.decoders = _OneSided(fn.decoders, "crop-dec")

    def __getattr__(self, name):
        return getattr(self._fn, name)

    def _second(self, name):
        self._calls[name] = self._calls.get(name, 0) + 1
        return self._calls[name] == 2

    def flip(self, data, **kw):
        if self._what == "flip" and self._second("flip"):
            kw = {"horizontal": kw["horizontal"]}  # the mask misses the vertical flip
        return self._fn.flip(data, **kw)

    def image_slice(self, data, anchor, shape, **kw):
        if self._second("image_slice"):
            anchor = anchor * 0  # the mask is cut at the top-left corner instead
        return self._fn.image_slice(data, anchor, shape, **kw)


@pytest.mark.parametrize("what", ["flip", "crop"])
def test_alignment_check_catches_one_sided_augmentation(coded_dataset, monkeypatch, what):
    real = dali_mod._import_dali

    def patched():
        Pipeline, fn, types, It, Policy = real()
        return Pipeline, _OneSided(fn, what), types, It, Policy

    monkeypatch.setattr(dali_mod, "_import_dali", patched)
    idx = discover(coded_dataset)
    dl = make_dali_train_loader(idx, idx.samples, scheme("full"), (24, 40), 4, ctx(), seed=0)
    bad = sum(misaligned(x, y) for x, y in dl)
    assert bad > 0  # the same check that passes above fails on a one-sided augmentation


def test_two_ranks_share_nothing_and_cover_the_split(id_coded_dataset):
    idx = discover(id_coded_dataset)
    n, batch, world = len(idx.samples), 2, 2
    loaders = [make_dali_train_loader(idx, idx.samples, scheme("six"), (32, 32), batch,
                                      ctx(r, world), seed=5) for r in range(world)]
    assert len(loaders[0]) == len(loaders[1]) == 3
    orders = []
    for epoch in (0, 1, 2):
        seen = []
        for dl in loaders:
            dl.set_epoch(epoch)
            ids = [int(i) for x, _ in dl for i in channel(x, 2)[:, 0, 0]]  # blue = sample id
            assert len(ids) == len(dl) * batch
            seen.append(ids)
        a, b = set(seen[0]), set(seen[1])
        assert len(a) == len(seen[0]) and len(b) == len(seen[1])  # no repeat within a rank
        assert not a & b
        dropped = set(range(n)) - (a | b)
        assert len(dropped) < world * batch and a | b | dropped == set(range(n))
        orders.append(seen[0])
    assert orders[0] != orders[1]  # reshuffled every epoch


def test_epochs_resume_correctly_after_partial_consumption(coded_dataset):
    idx = discover(coded_dataset)
    args = (idx, idx.samples, scheme("six"), (32, 32), 2, ctx())

    def epoch_ids(dl, epoch, take=None):
        dl.set_epoch(epoch)
        out = []
        for k, (x, y) in enumerate(dl):
            if take is not None and k == take:
                break
            out.append((channel(x, 1)[:, 0, :].sum().item(), y.sum().item()))
        return out

    fresh = {e: epoch_ids(make_dali_train_loader(*args, seed=2), e) for e in (0, 1, 3)}
    dl = make_dali_train_loader(*args, seed=2)
    assert len(dl) == 6
    assert epoch_ids(dl, 0, take=4) == fresh[0][:4]  # left early (grad-accum remainder)
    pipe = dl._pipe
    assert epoch_ids(dl, 1) == fresh[1]               # finishes epoch 0, then epoch 1...
    assert dl._pipe is pipe                           # ...on the same pipeline
    assert epoch_ids(dl, 3) == fresh[3]               # a jump rebuilds the pipeline
    assert dl._pipe is not pipe
    assert epoch_ids(dl, 3) != fresh[1]


def test_prepared_cache_jpeg_and_scheme_guard(tmp_path):
    write_layout(tmp_path / "src", "tugraz", n=6, h=48, w=64)  # RGB colour masks
    idx_src = discover(tmp_path / "src")
    with pytest.raises(DatasetError, match="RGB colour.*launch/prepare.py --src"):
        make_dali_train_loader(idx_src, idx_src.samples, scheme("six"), (32, 32), 2, ctx())
    prepare(tmp_path / "src", tmp_path / "cache", size=64, classes="six", workers=1)
    idx = discover(tmp_path / "cache")
    train, _ = idx.split(0.15, 0)
    six = scheme("six")
    dl = make_dali_train_loader(idx, train, six, (32, 32), 2, ctx(), seed=1)
    ds = SegDataset(idx, train, six, (32, 32), seed=1)
    tl = make_train_loader(ds, 2, 0, 1, seed=1)
    for (xa, ya), (xb, yb) in zip(dl, tl):
        assert torch.equal(ya, yb) and int(ya.max()) < 6
        # JPEG: DALI's and Pillow's decoders may differ by a few levels.
        assert (xa - xb).abs().max() < 0.2
    with pytest.raises(DatasetError, match="prepared for --classes six.*--classes binary"):
        make_dali_train_loader(idx, train, scheme("binary"), (32, 32), 2, ctx())


def test_clear_errors(coded_dataset, monkeypatch):
    idx = discover(coded_dataset)
    with pytest.raises(ConfigError, match="no full batch.*lower --batch-size"):
        make_dali_train_loader(idx, idx.samples, scheme("six"), (32, 32), 8, ctx(0, 2))
    for mod in ("nvidia.dali", "nvidia.dali.plugin.pytorch"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ConfigError, match="needs nvidia-dali.*pip install nvidia-dali-cuda120"
                                          ".*--loader torch"):
        make_dali_train_loader(idx, idx.samples, scheme("six"), (32, 32), 2, ctx())


def test_source_runs_off_the_training_thread_and_close_is_clean(coded_dataset, monkeypatch):
    """The file reads and draws run in the read-ahead thread; close() stops DALI's
    executor and that thread at once, and nothing but the loader holds the pipeline."""
    import gc
    import threading
    import weakref

    threads = set()
    real_batch = dali_mod._PairSource.batch

    def batch(self, k):
        threads.add(threading.current_thread().name)
        return real_batch(self, k)

    monkeypatch.setattr(dali_mod._PairSource, "batch", batch)
    idx = discover(coded_dataset)
    dl = make_dali_train_loader(idx, idx.samples, scheme("six"), (32, 32), 2, ctx(), seed=0)
    assert len(list(dl)) == len(dl)
    assert threads and all(name.startswith("dali-source") for name in threads)
    assert threading.current_thread().name not in threads
    pipe, source = dl._pipe, dl._source
    ahead = list(source._pool._threads)  # this loader's (earlier tests' may still run)
    assert ahead and all(t.is_alive() for t in ahead)
    gc.disable()  # the pipeline must go by reference counting, not a later collection
    try:
        ref = weakref.ref(pipe)
        del pipe
        dl.close()
        assert ref() is None
        assert not any(t.is_alive() for t in ahead)
        assert source._pool._shutdown
        assert dl._pipe is None and dl._source is None
    finally:
        gc.enable()
    # A later epoch builds a new pipeline and still serves the same batches.
    again = make_dali_train_loader(idx, idx.samples, scheme("six"), (32, 32), 2, ctx(),
                                   seed=0)
    dl.set_epoch(1)
    again.set_epoch(1)
    for (xa, ya), (xb, yb) in zip(dl, again):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert dl.num_workers == dl.num_threads


def test_memory_mb_reads_dali_statistics_or_says_none(coded_dataset):
    idx = discover(coded_dataset)
    dl = make_dali_train_loader(idx, idx.samples, scheme("six"), (32, 32), 2, ctx(), seed=0)
    assert dl.memory_mb() is None  # no pipeline yet
    next(iter(dl))
    mb = dl.memory_mb()
    # DALI's dynamic executor (the default since 2.0) keeps no per-operator statistics.
    assert mb is None or mb > 0
    dl.close()
    assert dl.memory_mb() == mb  # kept after the pipeline is gone
