"""JPEG decode on the GPU with nvJPEG, through ``torchvision.io.decode_jpeg``.

The CPU path (:func:`segcore.data.images.read_image`, the training datasets) decodes with
PIL and ``convert("RGB")``. This module decodes the same files on a CUDA device, batched:
``torchvision.io.decode_jpeg([blob, ...], device="cuda", mode=RGB)`` hands the compressed
bytes to nvJPEG and returns uint8 ``[3, H, W]`` tensors already on the device, so a
24 Mpx photo crosses the PCIe bus as ~5 MB of JPEG instead of 72 MB of pixels, and the
host's cores are free for other work. EXIF orientation is ignored, as on the CPU path.

Where both decoders agree (baseline JPEGs; libjpeg-turbo and nvJPEG may differ by a
level in chroma upsampling on some files) the pixels equal the CPU decode. torchvision is
imported lazily, only when a GPU decode is asked for: a CPU-only machine never needs it.
Tests inject a PIL-based ``decoder`` with the same calling convention, so everything but
nvJPEG itself runs on a CPU.

Errors: :func:`check_gpu_decode` is the one-line :class:`ConfigError` a launcher raises
at start (no CUDA device, no torchvision, or a torchvision without nvJPEG). A corrupt
file raises :class:`GpuDecodeError`, an :class:`~segcore.data.images.ImageReadError`
(the CPU path's type) naming the file; when a batch fails, its files are decoded one by
one to find which.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import torch

from segcore.data.images import ImageReadError
from segcore.errors import ConfigError
from segcore.faults import one_line

__all__ = ["Decoder", "GpuDecodeError", "check_gpu_decode", "default_decoder",
           "as_byte_tensor", "decode_jpegs"]

# decoder(list of 1-D uint8 CPU tensors, device=...) -> list of uint8 [3, H, W] tensors
# (torchvision's decode_jpeg for a list, with mode=RGB bound).
Decoder = Callable[..., Sequence[torch.Tensor]]
# What a decoder raises on a file it cannot decode (torchvision: RuntimeError).
_DECODE_ERRORS = (RuntimeError, ValueError, OSError, TypeError)


class GpuDecodeError(ImageReadError):
    """One JPEG cannot be decoded on the device.

    Attributes:
        name: the file (as given to :func:`decode_jpegs`).
        reason: why, without the name (the folder run adds its own path).
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def _import_decode_jpeg() -> tuple[Callable[..., Any], Any]:
    """``(torchvision.io.decode_jpeg, ImageReadMode.RGB)``, or a one-line ConfigError."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as e:  # ImportError, or a wheel built for another torch/CUDA
        raise ConfigError(
            f"--decode gpu needs torchvision with nvJPEG, which is not importable "
            f"({one_line(e, 160)}); install the torchvision build matching torch "
            f"{torch.__version__} (pip install torchvision), or use --decode cpu") from None
    return decode_jpeg, ImageReadMode.RGB


def default_decoder() -> Decoder:
    """torchvision's batched ``decode_jpeg`` with RGB output (PIL's ``convert("RGB")``).

    Raises:
        ConfigError: torchvision is not importable.
    """
    decode_jpeg, rgb = _import_decode_jpeg()

    def decode(tensors: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
        out = decode_jpeg(tensors, mode=rgb, device=device)
        return [out] if isinstance(out, torch.Tensor) else list(out)

    return decode


def _tiny_jpeg() -> bytes:
    """A 16 x 16 JPEG made here, for the start-up check."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def check_gpu_decode(device: torch.device | str, decoder: Decoder | None = None) -> None:
    """Fail at start, in one line, when JPEGs cannot be decoded on ``device``.

    Decodes one tiny JPEG on the device, so a torchvision built without nvJPEG (or a
    CUDA runtime it cannot use) is found before the first photo, not after the model
    has loaded.

    Args:
        device: the device prediction or training runs on.
        decoder: injected decoder (tests); default torchvision's.

    Raises:
        ConfigError: ``device`` is not CUDA, no CUDA device is available, torchvision is
            missing, or its decode_jpeg cannot decode on the device.
    """
    device = torch.device(device)
    if decoder is None:
        if not torch.cuda.is_available():
            raise ConfigError("--decode gpu needs a CUDA device, and none is available "
                              "(torch.cuda.is_available() is False); use --decode cpu")
        if device.type != "cuda":
            raise ConfigError(f"--decode gpu needs a CUDA device, but this run uses "
                              f"{device}; run on CUDA (predict.py: --device cuda) or use "
                              "--decode cpu")
        decoder = default_decoder()
    try:
        out = list(decoder([as_byte_tensor(_tiny_jpeg())], device=device))
    except Exception as e:  # anything: this is the probe that turns it into one line
        raise ConfigError(f"--decode gpu needs torchvision with nvJPEG, but decoding a test "
                          f"JPEG on {device} failed ({type(e).__name__}: "
                          f"{one_line(e, 160)}); use --decode cpu") from None
    if len(out) != 1 or tuple(out[0].shape) not in ((3, 16, 16), (1, 16, 16)):
        raise ConfigError(f"--decode gpu: the JPEG decoder returned "
                          f"{[tuple(t.shape) for t in out]} for one 16x16 RGB test image "
                          "instead of [(3, 16, 16)]; use --decode cpu")


def as_byte_tensor(blob: bytes | bytearray | memoryview | torch.Tensor) -> torch.Tensor:
    """A file's bytes as the 1-D uint8 CPU tensor decode_jpeg takes (bytes are copied
    once, into a writable buffer; a tensor is used as it is)."""
    if isinstance(blob, torch.Tensor):
        if blob.dtype != torch.uint8 or blob.dim() != 1:
            raise ValueError(f"encoded JPEG tensors must be 1-D uint8, got {blob.dtype} "
                             f"{tuple(blob.shape)}")
        return blob
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def _as_rgb(t: torch.Tensor, name: str) -> torch.Tensor:
    """A decoder's output as uint8 ``[3, H, W]``: a 1-channel result (a grayscale JPEG
    decoded without RGB conversion) is expanded exactly as PIL's L -> RGB does."""
    if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[0] not in (1, 3):
        raise GpuDecodeError(name, f"the decoder returned {t.dtype} {tuple(t.shape)} "
                                   "instead of uint8 [3, H, W]")
    return t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t


def _decode_one(decoder: Decoder, tensor: torch.Tensor, name: str,
                device: torch.device) -> torch.Tensor:
    try:
        out = list(decoder([tensor], device=device))
    except _DECODE_ERRORS as e:
        raise GpuDecodeError(name, f"cannot decode on {device} ({type(e).__name__}: "
                                   f"{one_line(e, 200)})") from None
    if len(out) != 1:
        raise GpuDecodeError(name, f"the decoder returned {len(out)} images for one file")
    return _as_rgb(out[0], name)


def decode_jpegs(blobs: Sequence[bytes | torch.Tensor], names: Sequence[str],
                 device: torch.device | str, decoder: Decoder | None = None
                 ) -> list[torch.Tensor]:
    """Decode a batch of JPEG files on ``device`` in one decoder call.

    Args:
        blobs: the files' bytes (or 1-D uint8 CPU tensors of them).
        names: one name per blob, for error messages.
        device: where the pixels land (``cuda`` for nvJPEG).
        decoder: ``decoder(list_of_byte_tensors, device=...) -> list of uint8 [3, H, W]``;
            default torchvision's ``decode_jpeg`` with RGB output.

    Returns:
        uint8 ``[3, H, W]`` RGB tensors on ``device``, in input order.

    Raises:
        GpuDecodeError: a file that cannot be decoded (an ImageReadError naming it); the
            first such file of the batch.
        ConfigError: no decoder was given and torchvision is not importable.
        ValueError: ``blobs`` and ``names`` differ in length.
    """
    if len(blobs) != len(names):
        raise ValueError(f"{len(blobs)} blobs but {len(names)} names")
    if not blobs:
        return []
    device = torch.device(device)
    decoder = decoder or default_decoder()
    tensors = []
    for blob, name in zip(blobs, names):
        try:
            tensors.append(as_byte_tensor(blob))
        except ValueError as e:
            raise GpuDecodeError(name, str(e)) from None
    try:
        out = list(decoder(tensors, device=device))
    except _DECODE_ERRORS:
        # nvJPEG fails the whole batch for one bad file: find it, one file at a time.
        return [_decode_one(decoder, t, n, device) for t, n in zip(tensors, names)]
    if len(out) != len(tensors):
        raise GpuDecodeError(names[0], f"the decoder returned {len(out)} images for a "
                                       f"batch of {len(tensors)} files")
    return [_as_rgb(t, n) for t, n in zip(out, names)]
