import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from segcore.data.classes import scheme
from segcore.data.dataset import (MEAN, STD, AugmentParams, SegDataset, ShardSampler,
                                  apply_augment, make_train_loader)
from segcore.data.layouts import DatasetError, discover, split_samples

from conftest import write_pair


def decode_red(img: torch.Tensor) -> np.ndarray:
    red = (img[0] * STD[0] + MEAN[0]) * 255
    return torch.round(red / 10).long().numpy()


def test_split_is_deterministic_disjoint_and_sized(coded_dataset):
    idx = discover(coded_dataset)
    train, test = split_samples(idx.samples, 0.15, seed=3)
    assert len(test) == 2 and len(train) == 10
    assert not {s.stem for s in train} & {s.stem for s in test}
    assert split_samples(idx.samples, 0.15, seed=3) == (train, test)
    assert split_samples(idx.samples, 0.15, seed=4)[1] != test


def test_torch_augmentation_keeps_mask_aligned(coded_dataset):
    idx = discover(coded_dataset)
    ds = SegDataset(idx, idx.samples, scheme("full"), (32, 32), train=True, seed=1)
    flips = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            img, mask = ds[i]
            assert img.shape == (3, 32, 32) and mask.shape == (32, 32)
            np.testing.assert_array_equal(decode_red(img), mask.numpy())
            # green/blue encode the source column/row: recover the flip state
            g = torch.round((img[1] * STD[1] + MEAN[1]) * 255)
            flips.add(bool(g[0, 0] > g[0, -1]))
    assert flips == {True, False}  # both flipped and unflipped draws happened


def test_alignment_check_catches_a_one_sided_flip(coded_dataset):
    idx = discover(coded_dataset)
    image, mask = idx.load_image(idx.samples[0]), idx.load_mask(idx.samples[0], scheme("full"))
    p = AugmentParams(top=4, left=8, hflip=True, vflip=False)
    img_a, _ = apply_augment(image, mask, p, (32, 32))
    _, mask_b = apply_augment(image, mask, AugmentParams(4, 8, False, False), (32, 32))
    assert not np.array_equal(img_a[..., 0] // 10, mask_b)


def test_remap_to_six_and_binary(coded_dataset):
    idx = discover(coded_dataset)
    s = idx.samples[0]
    full = idx.load_mask(s, scheme("full"))
    six = idx.load_mask(s, scheme("six"))
    np.testing.assert_array_equal(six, scheme("six").lut[full])
    binary = idx.load_mask(s, scheme("binary"))
    np.testing.assert_array_equal(binary, (full == 1).astype(np.uint8))


def test_mask_value_outside_table_is_a_clear_error(tmp_path):
    root = tmp_path / "bad"
    img = np.zeros((16, 16, 3), np.uint8)
    mask = np.full((16, 16), 30, np.uint8)
    write_pair(root, "000", img, mask)
    write_pair(root, "001", img, np.zeros((16, 16), np.uint8))
    idx = discover(root)
    with pytest.raises(DatasetError, match=r"000.png holds value\(s\) \[30\].*class table"):
        idx.load_mask(idx.samples[0], scheme("six"))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*--data"):
        discover(tmp_path / "nope")


def test_train_shards_are_disjoint_and_eval_covers_each_once(coded_dataset):
    idx = discover(coded_dataset)
    ds = SegDataset(idx, idx.samples, scheme("six"), (32, 32))
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = make_train_loader(ds, 2, rank, 2, seed=0)
            loader.sampler.set_epoch(epoch)
            pairs = list(loader.sampler)
            assert {e for e, _ in pairs} == {epoch}  # the epoch travels with each index
            seen.append({i for _, i in pairs})
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == set(range(len(ds)))
    for n in (7, 12):
        got = sorted(i for r in range(2) for i in ShardSampler(n, r, 2))
        assert got == list(range(n))


def set_epoch_like_the_trainer(loader, epoch: int) -> None:
    """What ``Trainer._train`` does before each epoch: every object with ``set_epoch``."""
    for obj in (getattr(loader, "sampler", None), loader, getattr(loader, "dataset", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def shuffled_order(n: int, seed: int, epoch: int) -> list[int]:
    """Rank 0 of 1's order for ``epoch``, computed independently of the loader."""
    s = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=seed,
                           drop_last=True)
    s.set_epoch(epoch)
    return list(s)


def test_worker_processes_see_the_epoch(coded_dataset):
    """Persistent workers hold copies of the dataset made at the first ``iter()``: the
    epoch must reach them, or every epoch repeats epoch 0's crops and flips."""
    idx = discover(coded_dataset)
    six = scheme("six")
    ds = SegDataset(idx, idx.samples, six, (32, 32), train=True, seed=3)
    loader = make_train_loader(ds, 2, 0, 1, seed=3, num_workers=2)
    reference = SegDataset(idx, idx.samples, six, (32, 32), train=True, seed=3)
    images = {}
    for epoch in (0, 1):
        set_epoch_like_the_trainer(loader, epoch)
        reference.set_epoch(epoch)  # in this process: indexed directly, no workers
        order = shuffled_order(len(ds), 3, epoch)
        got = [(x, y) for x, y in loader]
        assert len(got) == len(order) // 2
        for b, (x, y) in enumerate(got):
            for j, i in enumerate(order[2 * b:2 * b + 2]):
                rx, ry = reference[i]
                assert torch.equal(y[j], ry), f"epoch {epoch} sample {i}: mask differs"
                assert torch.equal(x[j], rx), f"epoch {epoch} sample {i}: image differs"
                images[epoch, i] = x[j]
    differ = sum(not torch.equal(images[0, i], images[1, i]) for i in range(len(ds)))
    assert differ >= len(ds) - 1  # new crops and flips every epoch


def test_raw_batches_normalized_on_the_device_equal_the_host_path(coded_dataset):
    """uint8 transfer + normalization on the device gives the float batches of the host
    path bit for bit, in the memory format asked for; masks become int64."""
    from segcore.data.dataset import DeviceBatches, normalize_batch

    idx = discover(coded_dataset)
    six = scheme("six")
    host = SegDataset(idx, idx.samples, six, (32, 32), train=True, seed=2)
    raw = SegDataset(idx, idx.samples, six, (32, 32), train=True, seed=2, raw=True)
    image, mask = raw[(1, 5)]
    assert image.dtype == torch.uint8 and image.shape == (32, 32, 3)
    assert mask.dtype == torch.uint8 and mask.shape == (32, 32)
    for channels_last in (True, False):
        batches = DeviceBatches(make_train_loader(raw, 2, 0, 1, seed=2), "cpu", channels_last)
        reference = make_train_loader(host, 2, 0, 1, seed=2)
        batches.set_epoch(1)
        set_epoch_like_the_trainer(reference, 1)
        assert len(batches) == len(reference) and batches.num_workers == 0
        for (x, y), (rx, ry) in zip(batches, reference):
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
            assert torch.equal(x, rx) and torch.equal(y, ry)
    x, _ = next(iter(batches.on("cpu")))
    assert x.device.type == "cpu"
    with pytest.raises(ValueError, match="uint8 \\[B, H, W, 3\\]"):
        normalize_batch(torch.zeros(1, 3, 8, 8))


def test_default_num_workers_follow_cores_and_local_ranks(monkeypatch):
    from segcore import host
    from segcore.data.dataset import MAX_AUTO_WORKERS, default_num_workers

    monkeypatch.setattr(host, "usable_cores", lambda: 16)
    assert default_num_workers("cpu", 1) == 0  # training threads own the cores
    assert default_num_workers("cuda:0", 1) == MAX_AUTO_WORKERS
    assert default_num_workers("cuda:0", 4) == 3  # 16 / 4 ranks, less the trainer
    assert default_num_workers("cuda:0", 16) == 1  # never 0 on a GPU
