"""NVIDIA DALI training loader: interchangeable with the torch loader, faster.

:func:`make_dali_train_loader` serves the same batches as
``make_train_loader(SegDataset(..., train=True))``: the same per-epoch shard of the same
shuffled order (``DistributedSampler(seed, epoch, drop_last=True)``), the same crop window
and flips for sample ``i`` at epoch ``e`` (``draw_augment`` seeded with ``(seed, e, i)``),
the same normalization and the same padding of images smaller than the crop. What differs
is where the work happens: DALI decodes (on the GPU with ``device="mixed"`` when the
training device is CUDA, on its CPU thread pool otherwise), decodes only the crop window
(``decoders.image_slice``), flips, remaps the mask with a lookup table and normalizes in
its own threads, ahead of the training loop, and hands over tensors already on the device.

Design: one ``external_source`` feeds each batch as (encoded image, encoded mask, crop
anchor, horizontal flip, vertical flip), and the anchor and flip values are the *same*
DALI nodes fed to the image and the mask operators, so the pair cannot drift apart.
Compared with two ``fn.readers.file`` readers kept in step by a shared seed, one source
(1) pairs image and mask by construction rather than by two shufflers staying in lockstep,
(2) shuffles the whole split every epoch exactly like ``DistributedSampler`` (the file
reader shuffles within a fixed shard through a buffer), so ``set_epoch`` means the same
thing for both loaders, and (3) yields only full batches of a ``drop_last`` shard, so every
rank runs the same number of steps and no sample repeats within an epoch (the
``LastBatchPolicy.DROP`` contract, enforced at the source). The source's Python work is a
file read and a few random numbers per sample; decoding stays in DALI. That work runs in a
read-ahead thread (:class:`_Readahead`), not in the training thread that drives DALI's
feed, and :meth:`DaliTrainLoader.close` shuts the pipeline and the thread down at once.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from segcore.config import ConfigError
from segcore.data.classes import IGNORE_INDEX, ClassScheme
from segcore.data.dataset import (MEAN, STD, AugmentParams, _pad_to,
                                  draw_augment)
from segcore.data.layouts import DatasetError, DatasetIndex, Sample


def _import_dali():
    """DALI's modules, or a ConfigError saying how to get them."""
    try:
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise ConfigError(
            f"loader 'dali' needs nvidia-dali, which is not importable ({e}); install it "
            "with: pip install nvidia-dali-cuda120 (CUDA 12; nvidia-dali-cuda110 for CUDA "
            "11), or use --loader torch") from None
    return Pipeline, fn, types, DALIGenericIterator, LastBatchPolicy


def _image_sizes(index: DatasetIndex, samples: Sequence[Sample]) -> list[tuple[int, int]]:
    """(height, width) per sample, checking that DALI can decode the masks as indices.

    A prepared cache records its sizes in the manifest; other layouts are read from the
    file headers (no decode).

    Raises:
        DatasetError: colour masks, masks that are not 8-bit grayscale, or size mismatches
            (all listed).
    """
    hint = (f"run launch/prepare.py --src {index.root} --out CACHE_DIR and train with "
            "--data CACHE_DIR, or use --loader torch")
    if index.mask_kind == "rgb":
        raise DatasetError(f"loader 'dali' reads index masks, but the masks under "
                           f"{index.root} ({index.layout} layout) are RGB colour images; {hint}")
    known = (index.manifest or {}).get("image_sizes", {})
    if all(s.stem in known for s in samples):
        return [(known[s.stem][1], known[s.stem][0]) for s in samples]
    from PIL import Image

    sizes, problems = [], []
    for s in samples:
        with Image.open(s.image) as im:
            w, h = im.size
        with Image.open(s.mask) as m:
            mode, msize = m.mode, m.size
        # DALI decodes masks as GRAY: a palette or 16-bit PNG would come out as
        # luminance or clipped values, not class indices.
        if mode != "L":
            problems.append(f"mask {s.mask} is mode {mode}, not 8-bit grayscale (L)")
        if msize != (w, h):
            problems.append(f"size mismatch: image {s.image} is {w}x{h} but mask {s.mask} "
                            f"is {msize[0]}x{msize[1]}")
        sizes.append((h, w))
    if problems:
        raise DatasetError(f"loader 'dali' cannot read {len(problems)} file(s):\n  "
                           + "\n  ".join(problems) + f"\n({hint})")
    return sizes


@dataclass(frozen=True, eq=False)
class _Plan:
    """Everything the source needs, and nothing that refers back to the loader: the
    pipeline holds the source, so a source holding the loader (which holds the pipeline)
    would make a reference cycle that outlives :meth:`DaliTrainLoader.close`."""

    index: DatasetIndex
    samples: tuple[Sample, ...]
    scheme: ClassScheme
    sizes: tuple[tuple[int, int], ...]
    crop: tuple[int, int]
    batch_size: int
    rank: int
    world_size: int
    seed: int
    augment: bool
    decoded: bool
    steps: int

    def augment_params(self, i: int, epoch: int) -> AugmentParams:
        """The crop window and flips of sample ``i`` at ``epoch`` (``SegDataset``'s rule)."""
        h, w = self.sizes[i]
        ch, cw = self.crop
        h, w = max(h, ch), max(w, cw)  # after _pad_to
        if self.augment:
            return draw_augment(np.random.default_rng((self.seed, epoch, i)), h, w, self.crop)
        return AugmentParams((h - ch) // 2, (w - cw) // 2, False, False)


class _PairSource:
    """The ``external_source`` work: batch ``k`` of the stream, as DALI inputs.

    The stream runs across epochs without a break (epoch ``base + k // L``, batch
    ``k % L`` of it), so DALI's prefetching carries on over epoch boundaries. Everything
    is a pure function of ``k``: the order from ``DistributedSampler``, the augmentation
    from ``(seed, epoch, i)`` — the torch loader's rule, so both give the same batches.
    """

    def __init__(self, plan: _Plan, base_epoch: int) -> None:
        self.plan = plan
        self.base = base_epoch
        self._order_epoch: int | None = None
        self._order: list[int] = []

    def order(self, epoch: int) -> list[int]:
        """This rank's sample indices for ``epoch``, cut to whole batches."""
        if self._order_epoch != epoch:
            p = self.plan
            sampler = torch.utils.data.DistributedSampler(
                range(len(p.samples)), num_replicas=p.world_size, rank=p.rank,
                shuffle=True, seed=p.seed, drop_last=True)
            sampler.set_epoch(epoch)
            self._order = list(sampler)[:p.steps * p.batch_size]
            self._order_epoch = epoch
        return self._order

    def batch(self, k: int) -> tuple[list[np.ndarray], ...]:
        p = self.plan
        epoch = self.base + k // p.steps
        b = k % p.steps
        idx = self.order(epoch)[b * p.batch_size:(b + 1) * p.batch_size]
        images, masks, anchors, hflips, vflips = [], [], [], [], []
        for i in idx:
            a = p.augment_params(i, epoch)
            if p.decoded:
                s = p.samples[i]
                image, mask = p.index.load_image(s), p.index.load_mask(s, p.scheme)
                image, mask = _pad_to(image, mask, *p.crop)
                images.append(np.ascontiguousarray(image))
                masks.append(np.ascontiguousarray(mask[..., None]))
            else:
                images.append(np.fromfile(p.samples[i].image, dtype=np.uint8))
                masks.append(np.fromfile(p.samples[i].mask, dtype=np.uint8))
            anchors.append(np.array([a.top, a.left], dtype=np.int32))
            hflips.append(np.array(a.hflip, dtype=np.int32))
            vflips.append(np.array(a.vflip, dtype=np.int32))
        return images, masks, anchors, hflips, vflips


class _Readahead:
    """The ``external_source`` callback: batches are made ahead in a background thread.

    DALI calls its source from the thread that asks for outputs, the training thread
    (~70-150 us of file reads and draws per sample). Because batch ``k`` is a pure
    function of ``k``, the next ``depth`` batches can be made early in another thread;
    the callback only picks up the finished one. File reads and image decodes release
    the GIL, so the two threads overlap.
    """

    def __init__(self, source: _PairSource, depth: int) -> None:
        self._source, self._depth = source, max(1, depth)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dali-source")
        self._ahead: dict[int, Future] = {}

    def __call__(self, info) -> tuple[list[np.ndarray], ...]:
        k = info.iteration
        for j in range(k, k + self._depth + 1):
            if j not in self._ahead:
                self._ahead[j] = self._pool.submit(self._source.batch, j)
        return self._ahead.pop(k).result()

    def close(self) -> None:
        """Drop the batches made ahead and end the thread (waits for the one running)."""
        for f in self._ahead.values():
            f.cancel()
        self._ahead.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaliTrainLoader:
    """Iterable of ``(x, y)`` training batches from a DALI pipeline.

    ``x``: float32 [B, 3, H, W], normalized with ``MEAN``/``STD``, channels_last memory
    format, on ``device``. ``y``: int64 [B, H, W] target indices on ``device``; mask values
    outside the class table become ``IGNORE_INDEX`` (the torch loader raises on them;
    ``launch/prepare.py`` rejects such pairs before training).

    Build it with :func:`make_dali_train_loader`.
    """

    def __init__(self, index: DatasetIndex, samples: Sequence[Sample], scheme: ClassScheme,
                 crop: tuple[int, int], batch_size: int, rank: int, world_size: int,
                 device: torch.device, seed: int = 0, augment: bool = True,
                 num_threads: int = 1, prefetch: int = 2) -> None:
        self.index, self.samples, self.scheme = index, list(samples), scheme
        self.crop, self.batch_size = (int(crop[0]), int(crop[1])), batch_size
        self.rank, self.world_size, self.device = rank, world_size, device
        self.seed, self.augment = seed, augment
        self.num_threads, self.prefetch = num_threads, prefetch
        self.lut = index.target_lut(scheme)  # raises for a cache of another scheme
        self.sizes = _image_sizes(index, self.samples)
        # Images smaller than the crop need _pad_to's reflect padding, which DALI has no
        # operator for: then the source decodes and pads in Python (slow, but only for
        # data smaller than the crop; a prepared cache at 1024 px never takes this path).
        # Per-image targets (unlabeled-binary on source labels: lut None) are no lookup
        # table either: the source computes them with the index, as the torch loader does.
        self.decoded = self.lut is None or any(h < self.crop[0] or w < self.crop[1]
                                               for h, w in self.sizes)
        self.epoch = 0
        self._steps = (len(self.samples) // world_size) // batch_size
        if self._steps == 0:
            raise ConfigError(
                f"loader 'dali': {len(self.samples)} training images give no full batch of "
                f"{batch_size} on each of {world_size} worker(s); lower --batch-size")
        self._plan = _Plan(index, tuple(self.samples), scheme, tuple(self.sizes), self.crop,
                           batch_size, rank, world_size, seed, augment, self.decoded,
                           self._steps)
        self.num_workers = num_threads  # DALI's CPU threads: the row's loader_workers
        self._iter: Any = None
        self._pipe: Any = None
        self._source: _Readahead | None = None
        self._mem_mb: float | None = None
        self._base = 0
        self._consumed = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self._steps

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle and augmentation of ``epoch`` for the next ``iter()``."""
        self.epoch = epoch

    def augment_params(self, i: int, epoch: int) -> AugmentParams:
        """The crop window and flips of sample ``i`` at ``epoch`` (``SegDataset``'s rule)."""
        return self._plan.augment_params(i, epoch)

    # -- pipeline -------------------------------------------------------------------------
    def _build(self, base_epoch: int) -> None:
        Pipeline, fn, types, DALIGenericIterator, LastBatchPolicy = _import_dali()
        self.close()
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if gpu else None
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                        device_id=device_id, seed=self.seed + self.rank,
                        prefetch_queue_depth=self.prefetch, enable_memory_stats=True)
        shape = types.Constant(np.array(self.crop, dtype=np.int32))
        self._source = _Readahead(_PairSource(self._plan, base_epoch), self.prefetch + 1)
        with pipe:
            img, msk, anchor, hflip, vflip = fn.external_source(
                source=self._source, num_outputs=5, batch=True,
                batch_info=True, dtype=[types.UINT8, types.UINT8, types.INT32, types.INT32,
                                        types.INT32])
            if self.decoded:
                img = fn.reshape(img, layout="HWC")
                msk = fn.reshape(msk, layout="HWC")
                if gpu:
                    img, msk = img.gpu(), msk.gpu()
                img = fn.slice(img, anchor, shape, axes=[0, 1])
                msk = fn.slice(msk, anchor, shape, axes=[0, 1])
            else:
                dec = "mixed" if gpu else "cpu"
                # Decode only the crop window: for JPEG that skips most of the IDCT work.
                img = fn.decoders.image_slice(img, anchor, shape, axes=[0, 1], device=dec,
                                              output_type=types.RGB,
                                              adjust_orientation=False)
                msk = fn.decoders.image_slice(msk, anchor, shape, axes=[0, 1], device=dec,
                                              output_type=types.GRAY,
                                              adjust_orientation=False)
                keys = [int(k) for k in np.flatnonzero(self.lut != IGNORE_INDEX)]
                msk = fn.lookup_table(msk, keys=keys, values=[int(self.lut[k]) for k in keys],
                                      default_value=IGNORE_INDEX, dtype=types.UINT8)
            # The same flip nodes drive both: image and mask cannot disagree.
            img = fn.flip(img, horizontal=hflip, vertical=vflip)
            msk = fn.flip(msk, horizontal=hflip, vertical=vflip)
            x = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="HWC",
                                         mean=[m * 255 for m in MEAN],
                                         std=[s * 255 for s in STD])
            pipe.set_outputs(x, msk)
        pipe.build()
        self._pipe = pipe
        # size=-1: the stream never ends; epochs are counted here (see __iter__).
        self._iter = DALIGenericIterator([pipe], ["x", "y"], size=-1, auto_reset=False,
                                         last_batch_policy=LastBatchPolicy.DROP)
        self._base, self._consumed = base_epoch, 0

    def close(self) -> None:
        """Stop the pipeline and the read-ahead thread now, and hand DALI's unused device
        memory back (a later ``iter()`` starts a new pipeline).

        Not left to the garbage collector: a pipeline alive until some later collection
        keeps its threads running and its memory pool held, next to the new pipeline.
        """
        self.memory_mb()  # keep the peak of the pipeline being closed
        self._iter = None
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            # What Pipeline.__del__ does, done now: stops DALI's executor threads.
            shutdown = getattr(pipe, "_shutdown", None)
            if shutdown is not None:
                shutdown()
            del pipe
        if self._source is not None:
            self._source.close()
            self._source = None
        if self.device.type == "cuda":
            from nvidia.dali import backend

            backend.ReleaseUnusedMemory()

    def memory_mb(self) -> float | None:
        """DALI's reserved buffers in MiB (largest seen over this loader's pipelines), as
        DALI's executor reports them; ``None`` where it does not (DALI's default dynamic
        executor keeps no per-operator statistics). The torch allocator never sees them."""
        if self._pipe is not None:
            try:
                stats = self._pipe.executor_statistics()
            except Exception:  # an executor without statistics
                stats = {}
            if stats:
                total = sum(sum(op.get("max_reserved_memory_size") or [0])
                            for op in stats.values())
                self._mem_mb = max(self._mem_mb or 0.0, total / 2 ** 20)
        return self._mem_mb

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = next(self._iter)[0]
        self._consumed += 1
        # DALI gives NHWC; permuting the view gives NCHW with channels_last strides, the
        # layout the model runs in, without a copy.
        x = out["x"].permute(0, 3, 1, 2)
        y = out["y"][..., 0]
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        return x, y.long()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        steps = len(self)
        if self._iter is not None:
            cur, pos = self._base + self._consumed // steps, self._consumed % steps
            if pos and cur + 1 == self.epoch and steps - pos <= max(1, steps // 2):
                # The last epoch was left a few batches early (grad_accum remainder):
                # finishing it is cheaper than a new pipeline, and most is prefetched.
                for _ in range(steps - pos):
                    self._next()
            elif pos or cur != self.epoch:
                self.close()
        if self._iter is None:
            self._build(self.epoch)
        return self._epoch_batches(steps)

    def _epoch_batches(self, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(steps):
            yield self._next()


def default_threads(ctx) -> int:
    """DALI worker threads per rank: this process's cores shared by the local ranks."""
    from segcore.host import usable_cores

    cores = usable_cores()
    local = getattr(ctx, "local_world_size", None) or getattr(ctx, "world_size", 1) or 1
    return max(1, min(8, cores // local))


def make_dali_train_loader(index: DatasetIndex, samples: Sequence[Sample],
                           scheme: ClassScheme, crop: tuple[int, int], batch_size: int, ctx,
                           seed: int = 0, augment: bool = True,
                           num_threads: int | None = None) -> DaliTrainLoader:
    """The DALI training loader for one rank.

    Args:
        index: where the files are (index masks, or a prepared cache).
        samples: the training split; every rank passes the same list.
        scheme: target class scheme (a cache must have been prepared for it).
        crop: (height, width) of the random crop.
        batch_size: images per rank per step.
        ctx: a ``DistContext`` (or anything with ``rank``, ``world_size``, ``device``).
        seed: shuffle and augmentation seed (the torch loader's ``seed``).
        augment: random crop + flips; otherwise a center crop.
        num_threads: DALI CPU threads (default: cores / local ranks, at most 8).

    Returns:
        A :class:`DaliTrainLoader` with ``__len__`` and ``set_epoch``.

    Raises:
        ConfigError: DALI is not installed, or the split gives no full batch per rank.
        DatasetError: colour masks (prepare a cache first), unreadable masks, size
            mismatches, or a cache prepared for another scheme.
    """
    _import_dali()  # fail at configuration time, before any file is read
    return DaliTrainLoader(index, samples, scheme, crop, batch_size, ctx.rank,
                           ctx.world_size, torch.device(ctx.device), seed=seed,
                           augment=augment,
                           num_threads=num_threads or default_threads(ctx))
