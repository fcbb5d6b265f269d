"""GPU JPEG decode (segcore.data.nvjpeg), exercised on a CPU with an injected decoder.

The injected decoder decodes with PIL exactly as :func:`segcore.data.images.read_image`
does, so these tests check everything around nvJPEG (batching, byte handling, RGB
layout, error isolation, start-up checks); ``test_nvjpeg_matches_pil_on_cuda`` checks
nvJPEG itself where a GPU and torchvision are present.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcore.data.images import ImageReadError, read_image
from segcore.data.nvjpeg import (GpuDecodeError, as_byte_tensor, check_gpu_decode,
                                 decode_jpegs)
from segcore.errors import ConfigError


def pil_decoder(calls: list | None = None):
    """A decoder with torchvision's list calling convention, decoding with PIL."""

    def decode(tensors, device):
        if calls is not None:
            calls.append(len(tensors))
        out = []
        for t in tensors:
            with Image.open(io.BytesIO(t.numpy().tobytes())) as im:
                im.load()  # raises on a corrupt file, like nvJPEG fails the batch
                arr = np.array(im.convert("RGB"))
            out.append(torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(device))
        return out

    return decode


def jpeg_file(path: Path, seed: int, size=(48, 40), mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format="JPEG", quality=85)
    return path


def test_batch_decode_is_pixel_equal_to_the_cpu_read(tmp_path):
    files = [jpeg_file(tmp_path / f"p{i}.jpg", i, size=(32 + 8 * i, 40)) for i in range(3)]
    files.append(jpeg_file(tmp_path / "gray.jpg", 9, mode="L"))
    calls: list[int] = []
    blobs = [f.read_bytes() for f in files]
    blobs[1] = as_byte_tensor(blobs[1])  # bytes and tensors mix
    out = decode_jpegs(blobs, [f.name for f in files], "cpu", decoder=pil_decoder(calls))
    assert calls == [4]  # one decoder call for the whole batch
    for f, t in zip(files, out):
        assert t.dtype == torch.uint8 and t.shape[0] == 3
        np.testing.assert_array_equal(t.permute(1, 2, 0).numpy(), read_image(f))


def test_one_channel_output_is_expanded_like_pil_l_to_rgb(tmp_path):
    f = jpeg_file(tmp_path / "g.jpg", 1, mode="L")

    def gray_decoder(tensors, device):
        return [torch.from_numpy(np.array(Image.open(io.BytesIO(t.numpy().tobytes()))))[None]
                for t in tensors]

    (t,) = decode_jpegs([f.read_bytes()], [f.name], "cpu", decoder=gray_decoder)
    np.testing.assert_array_equal(t.permute(1, 2, 0).numpy(), read_image(f))


def test_a_corrupt_jpeg_in_a_batch_is_named(tmp_path):
    good = [jpeg_file(tmp_path / f"ok{i}.jpg", i) for i in range(2)]
    data = good[0].read_bytes()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(data[: len(data) // 3])
    calls: list[int] = []
    files = [good[0], bad, good[1]]
    with pytest.raises(ImageReadError) as e:
        decode_jpegs([f.read_bytes() for f in files], [f.name for f in files], "cpu",
                     decoder=pil_decoder(calls))
    assert isinstance(e.value, GpuDecodeError) and e.value.name == "broken.jpg"
    assert str(e.value).startswith("broken.jpg: cannot decode on cpu")
    assert "\n" not in str(e.value)
    assert calls == [3, 1, 1]  # the batch, then one by one up to the bad file


def test_bad_arguments(tmp_path):
    f = jpeg_file(tmp_path / "a.jpg", 0)
    with pytest.raises(ValueError, match="2 blobs but 1 names"):
        decode_jpegs([f.read_bytes()] * 2, ["a"], "cpu", decoder=pil_decoder())
    with pytest.raises(GpuDecodeError, match="x.jpg: encoded JPEG tensors must be 1-D uint8"):
        decode_jpegs([torch.zeros(3, 3)], ["x.jpg"], "cpu", decoder=pil_decoder())
    assert decode_jpegs([], [], "cpu", decoder=pil_decoder()) == []


def test_check_gpu_decode_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"^--decode gpu needs a CUDA device, but this run "
                                          r"uses cpu; run on CUDA"):
        check_gpu_decode("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="none is available") as e:
        check_gpu_decode("cuda")
    assert "\n" not in str(e.value)
    check_gpu_decode("cpu", decoder=pil_decoder())  # a working decoder passes

    def broken(tensors, device):
        raise RuntimeError("nvjpeg not compiled in\nsecond line")

    with pytest.raises(ConfigError, match=r"decoding a test JPEG on cpu failed "
                                          r"\(RuntimeError: nvjpeg not compiled in") as e:
        check_gpu_decode("cpu", decoder=broken)
    assert "\n" not in str(e.value)


def test_missing_torchvision_is_one_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"--decode gpu needs torchvision with nvJPEG, "
                                          r"which is not importable") as e:
        check_gpu_decode("cuda")
    assert "\n" not in str(e.value) and "--decode cpu" in str(e.value)


def _cuda_torchvision() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg
    except Exception:
        return False
    return callable(decode_jpeg)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_torchvision(), reason="needs CUDA and torchvision (nvJPEG)")
def test_nvjpeg_matches_pil_on_cuda(tmp_path):
    """nvJPEG against PIL on the same files: equal, or at most 1 level apart on a few
    pixels (chroma upsampling may differ); a corrupt file is named."""
    check_gpu_decode("cuda")
    files = [jpeg_file(tmp_path / f"p{i}.jpg", i, size=(64, 48)) for i in range(3)]
    out = decode_jpegs([f.read_bytes() for f in files], [f.name for f in files], "cuda")
    for f, t in zip(files, out):
        assert t.device.type == "cuda"
        diff = np.abs(t.permute(1, 2, 0).cpu().numpy().astype(int) - read_image(f))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.05
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(files[0].read_bytes()[:200])
    with pytest.raises(ImageReadError, match="bad.jpg"):
        decode_jpegs([files[1].read_bytes(), bad.read_bytes()], ["p1.jpg", "bad.jpg"], "cuda")
