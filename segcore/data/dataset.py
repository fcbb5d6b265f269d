"""The torch DataLoader baseline: paired augmentation, deterministic splits, sharding.

Augmentation draws one set of random parameters per sample and applies it to the image
and the mask alike (crop window, horizontal flip, vertical flip); masks are never
interpolated, so class indices stay exact. The DALI pipeline implements the same
semantics (see :mod:`segcore.data.dali`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from segcore.data.classes import IGNORE_INDEX, ClassScheme
from segcore.data.layouts import DatasetIndex, Sample, split_samples  # noqa: F401

# ImageNet statistics: the usual choice, and the DALI pipeline uses the same numbers.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the paired augmentation (exposed so tests can check alignment)."""

    top: int
    left: int
    hflip: bool
    vflip: bool


def draw_augment(rng: np.random.Generator, height: int, width: int, crop: tuple[int, int],
                 flips: bool = True) -> AugmentParams:
    ch, cw = crop
    top = int(rng.integers(0, height - ch + 1))
    left = int(rng.integers(0, width - cw + 1))
    hflip = bool(rng.random() < 0.5) if flips else False
    vflip = bool(rng.random() < 0.5) if flips else False
    return AugmentParams(top, left, hflip, vflip)


def apply_augment(image: np.ndarray, mask: np.ndarray, p: AugmentParams,
                  crop: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Apply one parameter draw to an (H, W, 3) image and its (H, W) mask alike."""
    ch, cw = crop
    image = image[p.top:p.top + ch, p.left:p.left + cw]
    mask = mask[p.top:p.top + ch, p.left:p.left + cw]
    if p.hflip:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if p.vflip:
        image, mask = image[::-1], mask[::-1]
    return image, mask


def _pad_to(image: np.ndarray, mask: np.ndarray, h: int, w: int):
    """Pad an image smaller than the crop (reflect) and its mask (ignore index)."""
    ph, pw = max(0, h - image.shape[0]), max(0, w - image.shape[1])
    if ph == 0 and pw == 0:
        return image, mask
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect" if
                   min(image.shape[:2]) > max(ph, pw) else "edge")
    mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    return image, mask


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB image -> normalized float32 CHW (training and prediction alike)."""
    # np.require copies only when needed (flipped views, read-only decoded arrays).
    img = torch.from_numpy(np.require(image, requirements=["C", "W"]))
    img = img.permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (img - mean) / std


def to_tensor(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 HWC image -> normalized float CHW; uint8 mask -> int64 HW."""
    return (normalize_image(image),
            torch.from_numpy(np.require(mask, requirements=["C", "W"])).long())


class SegDataset(Dataset):
    """Pairs from a :class:`DatasetIndex`, remapped to a class scheme.

    Args:
        index: where the files are and how to read them.
        samples: the subset (a split) to serve.
        scheme: target class scheme.
        crop: (height, width) of the output. Training crops at a random position;
            evaluation crops the center.
        train: random crop + flips (when ``augment``) vs deterministic center crop.
        seed: base seed; sample i at epoch e draws from ``(seed, epoch, i)`` so the
            augmentation is reproducible whatever the worker count.
        cache: keep decoded arrays in memory after the first read (small datasets).
    """

    def __init__(self, index: DatasetIndex, samples: Sequence[Sample], scheme: ClassScheme,
                 crop: tuple[int, int], train: bool = True, augment: bool = True,
                 seed: int = 0, cache: bool = True) -> None:
        self.index, self.samples, self.scheme = index, list(samples), scheme
        self.crop, self.train, self.augment, self.seed = crop, train, augment, seed
        self.cache = cache
        self._mem: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._mem:
            return self._mem[i]
        s = self.samples[i]
        image, mask = self.index.load_image(s), self.index.load_mask(s, self.scheme)
        if image.shape[:2] != mask.shape[:2]:
            from segcore.data.layouts import DatasetError
            raise DatasetError(f"image {s.image} is {image.shape[1]}x{image.shape[0]} but its "
                               f"mask {s.mask} is {mask.shape[1]}x{mask.shape[0]}; they must "
                               "match (run launch/prepare.py to validate the dataset)")
        if self.cache:
            self._mem[i] = (image, mask)
        return image, mask

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(i)
        ch, cw = self.crop
        image, mask = _pad_to(image, mask, ch, cw)
        h, w = mask.shape
        if self.train and self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            p = draw_augment(rng, h, w, self.crop)
        else:
            p = AugmentParams((h - ch) // 2, (w - cw) // 2, False, False)
        image, mask = apply_augment(image, mask, p, self.crop)
        return to_tensor(image, mask)


class ShardSampler(Sampler[int]):
    """Evaluation sharding: rank r takes indices r, r + W, ... — every index exactly once
    over all ranks, no padding duplicates (so metrics summed over ranks are exact)."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.n, self.rank, self.world = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def make_train_loader(ds: SegDataset, batch_size: int, rank: int, world_size: int,
                      seed: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Training loader: a disjoint, per-epoch reshuffled shard per rank.

    ``DistributedSampler(drop_last=True)`` trims the tail so every rank gets the same
    number of samples and no sample is duplicated (call ``loader.sampler.set_epoch``).
    """
    sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)


def make_eval_loader(ds: SegDataset, batch_size: int, rank: int, world_size: int,
                     num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank, world_size),
                      num_workers=num_workers, pin_memory=pin_memory)


class SyntheticBatches:
    """Random tensors already on the device: isolates compute from the input pipeline.

    Yields ``steps_per_epoch`` identical-shape batches per epoch; the mask is a fixed
    random class map so the loss is well defined.
    """

    def __init__(self, batch_size: int, size: tuple[int, int], num_classes: int,
                 device: torch.device, steps_per_epoch: int, seed: int = 0,
                 channels_last: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, 3, *size, generator=g)
        y = torch.randint(0, num_classes, (batch_size, *size), generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.x, self.y = x.to(device), y.to(device)
        self.steps = steps_per_epoch

    def set_epoch(self, epoch: int) -> None:  # same interface as a sampler-backed loader
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.x, self.y
