"""Training batches decoded on the device: ``--decode gpu`` for the torch loader.

The worker processes do only what is cheap on a host: read each training JPEG as bytes
(kept in memory after the first read), read its header for the size, decode and crop its
mask (a PNG: masks stay on the CPU, they are a third of the bytes and need no colour
work), and draw the crop and flips. The training process then decodes the batch's JPEGs
in one nvJPEG call (:func:`segcore.data.nvjpeg.decode_jpegs`), cuts the same windows and
flips on the device, and normalizes there (:func:`~segcore.data.dataset.normalize_batch`).

The crops and flips are the torch loader's: each item's parameters come from
:meth:`SegDataset.params <segcore.data.dataset.SegDataset.params>` (the same
``(seed, epoch, index)`` stream, the same sampler), and an image smaller than the crop
is padded as :func:`~segcore.data.dataset.pad_mode` says. Where nvJPEG decodes a file to
the same pixels as PIL, a batch equals the torch loader's bit for bit
(``tests/test_decode.py`` checks it with a PIL decoder injected in nvJPEG's place).

Validation stays on the CPU path: its images are decoded once and kept in memory.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from segcore.data.dataset import (AugmentParams, DeviceBatches, SegDataset, augment_array,
                                  check_sizes, make_train_loader, mean_std, normalize_batch,
                                  pad_mask, pad_mode)
from segcore.data.layouts import DatasetError, Sample
from segcore.data.nvjpeg import Decoder, GpuDecodeError, decode_jpegs

__all__ = ["JpegCrops", "GpuDecodeBatches", "check_jpeg_files", "crop_on_device",
           "collate_jpeg", "make_gpu_decode_train_loader"]

_JPEG_MAGIC = b"\xff\xd8\xff"
# params columns of one item: crop window, flips, and the size of the stored image.
_TOP, _LEFT, _HFLIP, _VFLIP, _H, _W = range(6)


def check_jpeg_files(samples: Sequence[Sample]) -> None:
    """Fail at start, in one line, when a training image is not a JPEG (nvJPEG decodes
    JPEG only); reads three bytes per file.

    Raises:
        DatasetError: the first image that is not a JPEG, and what to do.
    """
    for s in samples:
        with open(s.image, "rb") as f:
            head = f.read(3)
        if head != _JPEG_MAGIC:
            raise DatasetError(f"--decode gpu decodes JPEG images, and {s.image} is not one; "
                               "prepare the dataset with launch/prepare.py (it writes "
                               "JPEGs), or use --decode cpu")


class JpegCrops(SegDataset):
    """A :class:`SegDataset` whose items leave the image encoded.

    An item is ``(jpeg, params, mask, index)``: the file's bytes (1-D uint8), int64
    ``[top, left, hflip, vflip, height, width]`` (the draw of :meth:`params` and the
    stored image's size), the mask cut and flipped (uint8 ``[ch, cw]``, padded with the
    ignore index) and the sample's index. The bytes and the decoded mask are kept in
    memory after the first read when ``cache``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encoded: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def load_encoded(self, i: int) -> tuple[torch.Tensor, np.ndarray]:
        """(the JPEG's bytes, the decoded mask) of sample ``i``.

        Raises:
            ImageReadError: the file's header cannot be read (one line naming it).
            DatasetError: not a JPEG, an unreadable mask, or sizes that differ.
        """
        if i in self._encoded:
            return self._encoded[i]
        s = self.samples[i]
        data = Path(s.image).read_bytes()
        height, width = _jpeg_size(s, data)
        mask = self.index.load_mask(s, self.scheme)
        check_sizes(s, (height, width), mask.shape[:2])
        item = (torch.frombuffer(bytearray(data), dtype=torch.uint8), mask)
        if self.cache:
            self._encoded[i] = item
        return item

    def __getitem__(self, key: int | tuple[int, int]):  # type: ignore[override]
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        data, mask = self.load_encoded(i)
        height, width = mask.shape
        ch, cw = self.crop
        padded = pad_mask(mask, ch, cw)
        p = self.params(epoch, i, *padded.shape)
        cut = np.require(augment_array(padded, p, self.crop), requirements=["C", "W"])
        params = torch.tensor([p.top, p.left, p.hflip, p.vflip, height, width],
                              dtype=torch.int64)
        return data, params, torch.from_numpy(cut), i


def _jpeg_size(s: Sample, data: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG's header, without decoding it."""
    from PIL import Image

    from segcore.data.images import ImageReadError
    from segcore.faults import one_line

    if data[:3] != _JPEG_MAGIC:
        check_jpeg_files([s])
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{s.image}: cannot decode ({type(e).__name__}: "
                             f"{one_line(e, 200)})") from None
    return height, width


def collate_jpeg(items: list) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor,
                                       torch.Tensor]:
    """Items of :class:`JpegCrops` as a batch: (list of JPEG byte tensors, params
    ``[B, 6]``, masks ``[B, ch, cw]``, indices ``[B]``). The bytes differ in length, so
    they stay a list."""
    blobs, params, masks, idx = zip(*items)
    return (list(blobs), torch.stack(params), torch.stack(masks),
            torch.tensor(idx, dtype=torch.int64))


def _source_index(n: int, start: int, length: int, mode: str, flip: bool,
                  device: torch.device) -> torch.Tensor:
    """Rows (or columns) of a stored image that a padded, flipped window reads."""
    idx = torch.arange(start, start + length, device=device)
    idx = torch.where(idx >= n, 2 * (n - 1) - idx, idx) if mode == "reflect" \
        else idx.clamp(max=n - 1)
    return idx.flip(0) if flip else idx


def crop_on_device(image: torch.Tensor, p: AugmentParams,
                   crop: tuple[int, int]) -> torch.Tensor:
    """One decoded image ``[3, H, W]`` cut and flipped as the torch loader cuts it.

    An image smaller than the crop is padded first (bottom and right, :func:`pad_mode`),
    as :func:`segcore.data.dataset._pad_to` pads on the host.

    Returns:
        uint8 ``[ch, cw, 3]`` (channels last, as the torch loader's items) on the
        image's device; a view when neither padding nor flips are needed.
    """
    ch, cw = crop
    _, height, width = image.shape
    ph, pw = max(0, ch - height), max(0, cw - width)
    hwc = image.permute(1, 2, 0)
    if ph or pw:
        mode = pad_mode(height, width, ph, pw)
        rows = _source_index(height, p.top, ch, mode, p.vflip, image.device)
        cols = _source_index(width, p.left, cw, mode, p.hflip, image.device)
        return hwc.index_select(0, rows).index_select(1, cols)
    out = hwc[p.top:p.top + ch, p.left:p.left + cw]
    dims = [d for d, on in ((0, p.vflip), (1, p.hflip)) if on]
    return out.flip(dims) if dims else out


class GpuDecodeBatches(DeviceBatches):
    """A loader of :class:`JpegCrops` batches as training batches on ``device``.

    Each batch's JPEGs are decoded in one call of ``decoder`` (nvJPEG by default), cut
    and flipped into one uint8 ``[B, ch, cw, 3]`` tensor on the device and normalized
    there; masks cross as uint8 and become int64. Yields what :class:`DeviceBatches
    <segcore.data.dataset.DeviceBatches>` yields, so the Trainer drives it the same way
    (``len``, ``sampler``, ``dataset``, ``set_epoch``, ``num_workers``).

    Args:
        loader: a DataLoader over a :class:`JpegCrops` with :func:`collate_jpeg`.
        device: where batches are decoded and delivered.
        channels_last: memory format of the images.
        decoder: :func:`decode_jpegs`'s decoder (tests inject a PIL one).
    """

    def __init__(self, loader: DataLoader, device: torch.device | str,
                 channels_last: bool = True, decoder: Decoder | None = None) -> None:
        super().__init__(loader, device, channels_last)
        self.decoder = decoder

    def on(self, device: torch.device | str) -> "GpuDecodeBatches":
        """The same batches decoded on another device."""
        return GpuDecodeBatches(self.loader, device, self.channels_last, self.decoder)

    def _names(self, idx: torch.Tensor) -> list[str]:
        samples = self.dataset.samples
        return [str(samples[i].image) for i in idx.tolist()]

    def batch(self, blobs: list[torch.Tensor], params: torch.Tensor,
              names: Sequence[str], crop: tuple[int, int]) -> torch.Tensor:
        """Decode, cut and flip one batch: uint8 ``[B, ch, cw, 3]`` on the device.

        Raises:
            GpuDecodeError: a file that cannot be decoded, or decodes to another size
                than its header's (an ImageReadError naming the file).
        """
        images = decode_jpegs(blobs, names, self.device, self.decoder)
        out = torch.empty((len(images), *crop, 3), dtype=torch.uint8, device=self.device)
        for b, (img, row, name) in enumerate(zip(images, params.tolist(), names)):
            if tuple(img.shape[1:]) != (row[_H], row[_W]):
                raise GpuDecodeError(name, f"decoded to {img.shape[2]}x{img.shape[1]} but "
                                           f"its header says {row[_W]}x{row[_H]}")
            p = AugmentParams(row[_TOP], row[_LEFT], bool(row[_HFLIP]), bool(row[_VFLIP]))
            out[b] = crop_on_device(img, p, crop)
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        nb = self.device.type == "cuda"
        if self._stats is None:  # once (see mean_std)
            self._stats = mean_std(self.device)
        crop = tuple(self.dataset.crop)
        for blobs, params, masks, idx in self.loader:
            x = self.batch(blobs, params, self._names(idx), crop)
            y = masks.to(self.device, non_blocking=nb).long()
            yield normalize_batch(x, self.channels_last, self._stats), y


def make_gpu_decode_train_loader(ds: JpegCrops, batch_size: int, rank: int,
                                 world_size: int, seed: int, device: torch.device | str,
                                 num_workers: int = 0, pin_memory: bool = False,
                                 channels_last: bool = True,
                                 decoder: Decoder | None = None) -> GpuDecodeBatches:
    """The GPU-decode training loader: :func:`make_train_loader`'s sampler, shards and
    workers over ``ds``, decoded on ``device`` (see :class:`GpuDecodeBatches`).

    Raises:
        DatasetError: a training image that is not a JPEG (:func:`check_jpeg_files`).
    """
    check_jpeg_files(ds.samples)
    loader = make_train_loader(ds, batch_size, rank, world_size, seed=seed,
                               num_workers=num_workers, pin_memory=pin_memory,
                               collate_fn=collate_jpeg)
    return GpuDecodeBatches(loader, device, channels_last, decoder)
