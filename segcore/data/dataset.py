"""The torch DataLoader baseline: paired augmentation, deterministic splits, sharding.

Augmentation draws one set of random parameters per sample and applies it to the image
and the mask alike (crop window, horizontal flip, vertical flip); masks are never
interpolated, so class indices stay exact. The DALI pipeline implements the same
semantics (see :mod:`segcore.data.dali`).

The loader is built to be a fair baseline against DALI on a GPU: worker processes sized
from the cores and the local ranks (:func:`default_num_workers`), persistent and
prefetching, that see every epoch (the epoch travels with each index, see
:class:`EpochShardSampler`); batches cross to the device as uint8 (4 bytes a pixel with
the mask instead of 20) and are normalized there (:class:`DeviceBatches`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from segcore.data.classes import IGNORE_INDEX, ClassScheme
from segcore.data.layouts import DatasetIndex, Sample

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
    return augment_array(image, p, crop), augment_array(mask, p, crop)


def augment_array(a: np.ndarray, p: AugmentParams, crop: tuple[int, int]) -> np.ndarray:
    """One parameter draw applied to one (H, W, ...) array: the window, then the flips
    (views, no copy)."""
    ch, cw = crop
    a = a[p.top:p.top + ch, p.left:p.left + cw]
    if p.hflip:
        a = a[:, ::-1]
    if p.vflip:
        a = a[::-1]
    return a


def pad_mode(height: int, width: int, ph: int, pw: int) -> str:
    """How an image smaller than the crop is padded (bottom and right): ``reflect``
    (numpy's: the edge row is not repeated), or ``edge`` when the padding is as large as
    a side (reflection would run out of rows). The GPU-decode loader pads the same way."""
    return "reflect" if min(height, width) > max(ph, pw) else "edge"


def pad_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pad a mask smaller than the crop with the ignore index (bottom and right)."""
    ph, pw = max(0, h - mask.shape[0]), max(0, w - mask.shape[1])
    if ph == 0 and pw == 0:
        return mask
    return np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)


def _pad_to(image: np.ndarray, mask: np.ndarray, h: int, w: int):
    """Pad an image smaller than the crop (:func:`pad_mode`) and its mask (ignore index)."""
    ph, pw = max(0, h - image.shape[0]), max(0, w - image.shape[1])
    if ph == 0 and pw == 0:
        return image, mask
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)),
                   mode=pad_mode(image.shape[0], image.shape[1], ph, pw))
    return image, pad_mask(mask, h, w)


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


def mean_std(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """:data:`MEAN` and :data:`STD` as float32 [1, 3, 1, 1] tensors on ``device``.

    Made once per device by the caller: building them per batch on a GPU would copy from
    pageable host memory, a copy that waits for the stream, so the host could never run
    ahead of the GPU.
    """
    return (torch.tensor(MEAN).view(1, 3, 1, 1).to(device),
            torch.tensor(STD).view(1, 3, 1, 1).to(device))


def normalize_batch(x: torch.Tensor, channels_last: bool = True,
                    stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 [B, H, W, 3] batch -> normalized float32 [B, 3, H, W] on ``x``'s device.

    The same arithmetic as :func:`normalize_image` (``/255``, ``-mean``, ``/std`` in
    float32), so a batch normalized on the device equals one normalized per image on
    the host, bit for bit.

    Args:
        x: uint8 images, channels last in the tensor's shape (as the dataset collates).
        channels_last: return channels_last strides (the permuted view's own layout, no
            copy); else contiguous NCHW.
        stats: :func:`mean_std` on ``x``'s device (made here when not given).
    """
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"normalize_batch: expected a uint8 [B, H, W, 3] batch, got "
                         f"{x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2)  # NCHW shape, channels_last strides
    if not channels_last:
        x = x.contiguous()  # in uint8: a quarter of the bytes of a float copy
    mean, std = stats if stats is not None else mean_std(x.device)
    return x.float().div_(255.0).sub_(mean).div_(std)


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
        raw: serve uint8 HWC images and uint8 masks, to be normalized on the device by
            :class:`DeviceBatches`; else normalized float CHW images and int64 masks.

    An item is ``ds[i]`` (at the epoch of :meth:`set_epoch`) or ``ds[(epoch, i)]`` (what
    :class:`EpochShardSampler` yields): worker processes keep the copy of the dataset
    they were started with, so only an epoch carried by the index reaches them.
    """

    def __init__(self, index: DatasetIndex, samples: Sequence[Sample], scheme: ClassScheme,
                 crop: tuple[int, int], train: bool = True, augment: bool = True,
                 seed: int = 0, cache: bool = True, raw: bool = False) -> None:
        self.index, self.samples, self.scheme = index, list(samples), scheme
        self.crop, self.train, self.augment, self.seed = crop, train, augment, seed
        self.cache, self.raw = cache, raw
        self._mem: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain integer indexing (``ds[i]``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded (image, mask) of sample ``i`` (kept when ``cache``).

        Raises:
            ImageReadError: the image cannot be decoded (one line naming the file).
            DatasetError: the mask is unreadable, or its size is not the image's.
        """
        if i in self._mem:
            return self._mem[i]
        s = self.samples[i]
        image, mask = self._decode_image(s), self.index.load_mask(s, self.scheme)
        check_sizes(s, image.shape[:2], mask.shape[:2])
        if self.cache:
            self._mem[i] = (image, mask)
        return image, mask

    def _decode_image(self, s: Sample) -> np.ndarray:
        from PIL import Image

        from segcore.data.images import ImageReadError
        from segcore.faults import one_line

        try:
            return self.index.load_image(s)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ImageReadError(f"{s.image}: cannot decode ({type(e).__name__}: "
                                 f"{one_line(e, 200)})") from None

    def params(self, epoch: int, i: int, height: int, width: int) -> AugmentParams:
        """The crop and flips of sample ``i`` at ``epoch`` for an image of ``height`` x
        ``width`` after padding: drawn from ``(seed, epoch, i)`` when training with
        augmentation, else the centre window. Every loader that claims this dataset's
        batches (the GPU-decode loader, DALI) draws through here or the same stream."""
        ch, cw = self.crop
        if self.train and self.augment:
            return draw_augment(np.random.default_rng((self.seed, epoch, i)), height,
                                width, self.crop)
        return AugmentParams((height - ch) // 2, (width - cw) // 2, False, False)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        image, mask = self.load(i)
        image, mask = _pad_to(image, mask, *self.crop)
        p = self.params(epoch, i, *mask.shape)
        image, mask = apply_augment(image, mask, p, self.crop)
        if self.raw:
            # Writable copies: crops and flips are views of the cached (read-only) arrays.
            return (torch.from_numpy(np.require(image, requirements=["C", "W"])),
                    torch.from_numpy(np.require(mask, requirements=["C", "W"])))
        return to_tensor(image, mask)


def check_sizes(s: Sample, image_hw: tuple[int, int], mask_hw: tuple[int, int]) -> None:
    """Raise a one-line DatasetError when a pair's image and mask differ in size."""
    if tuple(image_hw) != tuple(mask_hw):
        from segcore.data.layouts import DatasetError
        raise DatasetError(f"image {s.image} is {image_hw[1]}x{image_hw[0]} but its "
                           f"mask {s.mask} is {mask_hw[1]}x{mask_hw[0]}; they must "
                           "match (run launch/prepare.py to validate the dataset)")


class ShardSampler(Sampler[int]):
    """Evaluation sharding: rank r takes indices r, r + W, ... — every index exactly once
    over all ranks, no padding duplicates (so metrics summed over ranks are exact)."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.n, self.rank, self.world = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class EpochShardSampler(DistributedSampler):
    """``DistributedSampler`` whose items are ``(epoch, index)``: the epoch travels with
    every index into the worker processes, which hold their own copy of the dataset
    (``SegDataset.set_epoch`` in the training process never reaches a persistent worker).
    Order, sharding and ``drop_last`` are ``DistributedSampler``'s, so the DALI loader,
    which computes its order with ``DistributedSampler``, serves the same batches."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, i) for i in super().__iter__())


# Batches each worker keeps ready, at least and at most: DataLoader's default of 2 leaves
# a GPU step waiting whenever one decode is slow.
MIN_PREFETCH, MAX_PREFETCH = 2, 8
MAX_AUTO_WORKERS = 8


def prefetch_factor(num_workers: int, cores: int | None = None) -> int:
    """Batches each worker process keeps ready, sized from the cores.

    The loader holds about two batches per usable core in flight (``2 * cores /
    workers`` per worker, within :data:`MIN_PREFETCH` and :data:`MAX_PREFETCH`): a few
    workers on a many-core host queue deeper, so that one slow decode (a large JPEG, a
    page-cache miss) never empties the queue, while many workers need little each.
    16 cores, 8 workers: 4; 16 cores, 2 workers: 8; 2 cores, 1 worker: 4.

    Args:
        num_workers: worker processes of the loader (``> 0``).
        cores: usable cores (default: this process's affinity mask).
    """
    from segcore.host import usable_cores

    cores = usable_cores() if cores is None else cores
    per_worker = -(-2 * max(1, cores) // max(1, num_workers))  # ceil
    return max(MIN_PREFETCH, min(MAX_PREFETCH, per_worker))


def default_num_workers(device: torch.device | str, local_world_size: int = 1) -> int:
    """Loader worker processes per training process when none are configured.

    CUDA: this process's share of the usable cores (cores / local ranks), less one for the
    training thread, at most :data:`MAX_AUTO_WORKERS`, at least 1. CPU: 0, because the
    training threads already occupy every core and workers would only compete with them.
    """
    from segcore.host import usable_cores

    if torch.device(device).type != "cuda":
        return 0
    share = usable_cores() // max(1, int(local_world_size))
    return max(1, min(MAX_AUTO_WORKERS, share - 1))


def loader_kwargs(num_workers: int, pin_memory: bool) -> dict[str, Any]:
    """DataLoader settings of every torch loader: workers persist across epochs and
    prefetch :func:`prefetch_factor` batches each; batches are pinned for the copy."""
    kw: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=prefetch_factor(num_workers))
    return kw


def collate(items: list) -> Any:
    """``default_collate``, except in the training process itself (no workers): there a
    batch of tensors is stacked by numpy, one thread. ``torch.stack`` would run the
    copy on the intra-op thread pool, whose threads the training step owns: on a busy
    2-core host one stack of a 128 px uint8 batch took 0.3 ms or 127 ms by how the
    pool's threads were scheduled. In a worker, ``default_collate`` writes straight into
    shared memory, so it stays."""
    from torch.utils.data import default_collate, get_worker_info

    if get_worker_info() is not None or not items or not isinstance(items[0], tuple) \
            or not all(isinstance(t, torch.Tensor) for t in items[0]):
        return default_collate(items)
    return tuple(torch.from_numpy(np.stack([item[k].numpy() for item in items]))
                 for k in range(len(items[0])))


def make_train_loader(ds: SegDataset, batch_size: int, rank: int, world_size: int,
                      seed: int, num_workers: int = 0, pin_memory: bool = False,
                      collate_fn: Any = None) -> DataLoader:
    """Training loader: a disjoint, per-epoch reshuffled shard per rank.

    ``DistributedSampler(drop_last=True)`` trims the tail so every rank gets the same
    number of samples and no sample is duplicated (call ``loader.sampler.set_epoch``).
    Worker processes (``num_workers > 0``) persist across epochs and prefetch
    :func:`prefetch_factor` batches each; the epoch reaches them with every index
    (:class:`EpochShardSampler`). ``collate_fn``: how items become a batch (default
    stacking; the GPU-decode loader's items are JPEG bytes of varying length).
    """
    sampler = EpochShardSampler(ds, num_replicas=world_size, rank=rank, shuffle=True,
                                seed=seed, drop_last=True)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True,
                      collate_fn=collate_fn or collate,
                      **loader_kwargs(num_workers, pin_memory))


def make_eval_loader(ds: SegDataset, batch_size: int, rank: int, world_size: int,
                     num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank, world_size),
                      collate_fn=collate, **loader_kwargs(num_workers, pin_memory))


class DeviceBatches:
    """A loader of raw batches (``SegDataset(raw=True)``) as training batches on a device.

    Each uint8 batch is copied to ``device`` (asynchronously from pinned memory on CUDA)
    and normalized there (:func:`normalize_batch`); masks become int64 on the device.
    Yields what the DALI loader yields: float32 ``[B, 3, H, W]`` (channels_last strides
    when asked) and int64 ``[B, H, W]``, both on ``device``.

    ``len``, ``sampler``, ``dataset`` and ``set_epoch`` are the wrapped loader's, so the
    Trainer drives it like a DataLoader.

    Args:
        loader: a DataLoader over a raw dataset.
        device: where batches are delivered.
        channels_last: memory format of the images.
    """

    def __init__(self, loader: DataLoader, device: torch.device | str,
                 channels_last: bool = True) -> None:
        self.loader, self.device = loader, torch.device(device)
        self.channels_last = channels_last
        self.sampler = getattr(loader, "sampler", None)
        self.dataset = getattr(loader, "dataset", None)
        self.num_workers = int(getattr(loader, "num_workers", 0))
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def on(self, device: torch.device | str) -> "DeviceBatches":
        """The same batches delivered to another device (e.g. the CPU, for figures)."""
        return DeviceBatches(self.loader, device, self.channels_last)

    def set_epoch(self, epoch: int) -> None:
        for obj in (self.sampler, self.dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Asynchronous only from pinned memory on CUDA; elsewhere .to() is synchronous.
        nb = self.device.type == "cuda"
        if self._stats is None:  # once, not per batch or epoch (see mean_std)
            self._stats = mean_std(self.device)
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=nb)
            y = y.to(self.device, non_blocking=nb)
            yield normalize_batch(x, self.channels_last, self._stats), y.long()


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


def loader_throughput(loader, batches: int, warmup: int, device: torch.device | str,
                      epoch: int = 0) -> dict[str, Any]:
    """A training loader iterated alone, no model: how fast it can feed a step.

    ``warmup`` batches first (worker start, the in-memory cache, the batches the workers
    had queued), then ``batches`` timed ones, epoch after epoch from ``epoch`` as needed;
    the device is synchronized at both ends of the clock. Crops are drawn from
    ``(seed, epoch, index)``, so iterating the loader here changes no training batch.

    Args:
        loader: a training loader (``DeviceBatches``, the GPU-decode or DALI loader,
            synthetic batches): ``set_epoch``, ``len`` and ``(x, y)`` batches.
        batches: timed batches (at least 1).
        warmup: untimed batches before the clock.
        device: where the batches land (synchronized when CUDA).
        epoch: the first epoch to draw.

    Returns:
        ``loader_img_s`` (images per second of this process's loader),
        ``loader_batches`` and ``loader_images`` (what the figure rests on),
        ``loader_s`` (timed seconds).
    """
    import time

    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if len(loader) == 0:
        raise ValueError("loader_throughput: the loader yields no batch per epoch")
    need, seen, images = warmup + max(1, batches), 0, 0
    t0 = time.perf_counter() if warmup == 0 else None
    while seen < need:
        loader.set_epoch(epoch)
        epoch += 1
        for x, _y in loader:
            seen += 1
            if t0 is not None:
                images += x.shape[0]
            elif seen == warmup:  # the clock starts once the warm-up batches are in
                sync()
                t0 = time.perf_counter()
            if seen >= need:
                break
    sync()
    elapsed = time.perf_counter() - t0
    return {"loader_img_s": images / elapsed if elapsed > 0 else None,
            "loader_batches": need - warmup, "loader_images": images, "loader_s": elapsed}
