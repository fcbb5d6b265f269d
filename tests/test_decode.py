"""``--decode gpu``: the GPU-decode training loader against the torch loader.

nvJPEG needs CUDA and torchvision; here a PIL decoder is injected in its place (the same
calling convention as torchvision's batched ``decode_jpeg``), so everything but the
decode itself is checked on a CPU, the way tests/test_dali.py checks DALI against the
torch loader: same shards, crops, flips, padding and normalization, bit for bit.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from segcore.config import ConfigError, DataConfig
from segcore.data.classes import scheme
from segcore.data.dataset import (AugmentParams, DeviceBatches, SegDataset,
                                  loader_throughput, make_train_loader, prefetch_factor)
from segcore.data.gpu_loader import (JpegCrops, check_jpeg_files, crop_on_device,
                                     make_gpu_decode_train_loader)
from segcore.data.images import ImageReadError
from segcore.data.layouts import DatasetError, discover

from conftest import write_layout

CPU = torch.device("cpu")


def pil_decoder(tensors, device):
    """A stand-in for nvJPEG: PIL's decode (the CPU path's), as uint8 [3, H, W]."""
    out = []
    for t in tensors:
        with Image.open(io.BytesIO(t.numpy().tobytes())) as im:
            rgb = np.array(im.convert("RGB"))
        out.append(torch.from_numpy(rgb).permute(2, 0, 1).to(device))
    return out


@pytest.fixture
def jpeg_dataset(tmp_path):
    """8 coded pairs of 48x64, JPEG images (lossy: both paths decode the same bytes)."""
    write_layout(tmp_path / "jpg", "kaggle", n=8, ext=".jpg")
    return discover(tmp_path / "jpg")


def loaders(idx, crop, rank, world, workers, seed=3):
    six = scheme("six")
    gpu = make_gpu_decode_train_loader(
        JpegCrops(idx, idx.samples, six, crop, train=True, seed=seed), 2, rank, world,
        seed=seed, device=CPU, num_workers=workers, decoder=pil_decoder)
    ds = SegDataset(idx, idx.samples, six, crop, train=True, seed=seed, raw=True)
    cpu = DeviceBatches(make_train_loader(ds, 2, rank, world, seed=seed,
                                          num_workers=workers), CPU)
    return gpu, cpu


@pytest.mark.parametrize("crop,workers", [((32, 32), 0), ((56, 40), 0), ((32, 48), 2)],
                         ids=["crop", "pad", "crop-2workers"])
def test_same_batches_as_the_torch_loader(jpeg_dataset, crop, workers):
    """Interchangeable with the torch loader: same shard order, crops, flips, padding
    (the 56-row crop is taller than the 48-row images: reflect padding, ignore-index
    mask) and normalization, in every epoch, also when worker processes draw the crops."""
    for rank in (0, 1):
        gpu, cpu = loaders(jpeg_dataset, crop, rank, 2, workers)
        assert len(gpu) == len(cpu) == 2 and gpu.num_workers == workers
        for epoch in (0, 1):
            gpu.set_epoch(epoch)
            cpu.set_epoch(epoch)
            n = 0
            for (xa, ya), (xb, yb) in zip(gpu, cpu):
                assert xa.shape == (2, 3, *crop) and xa.dtype == torch.float32
                assert xa.is_contiguous(memory_format=torch.channels_last)
                assert ya.dtype == torch.int64 and ya.shape == (2, *crop)
                assert torch.equal(ya, yb) and torch.equal(xa, xb)
                n += 1
            assert n == 2
        if crop[0] > 48:
            assert (ya == 255).any()  # padded rows are ignored by the loss


def test_device_crop_matches_the_host_crop_for_every_flip_and_pad():
    """crop_on_device = numpy pad + window + flips (the torch loader's), including the
    edge padding used when the padding is as large as a side."""
    from segcore.data.dataset import _pad_to, apply_augment

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    mask = np.zeros((10, 12), np.uint8)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    for crop in ((8, 8), (14, 12), (24, 30)):  # inside; reflect pad; edge pad
        padded, pmask = _pad_to(image, mask, *crop)
        for hflip in (False, True):
            for vflip in (False, True):
                top, left = padded.shape[0] - crop[0], padded.shape[1] - crop[1]
                p = AugmentParams(top, left, hflip, vflip)
                want = np.ascontiguousarray(apply_augment(padded, pmask, p, crop)[0])
                got = crop_on_device(chw, p, crop)
                assert torch.equal(got, torch.from_numpy(want)), (crop, hflip, vflip)


def test_corrupt_jpeg_is_one_line_naming_the_file_as_on_the_cpu_path(jpeg_dataset):
    """A file corrupted after the dataset was checked: both paths raise ImageReadError,
    one line, naming the file."""
    bad = jpeg_dataset.samples[3].image
    data = bad.read_bytes()
    bad.write_bytes(data[:200] + b"\x00" * (len(data) - 200))  # header kept, data broken

    def broken_decoder(tensors, device):
        for t in tensors:  # PIL decodes zeroed scan data silently; nvJPEG would not
            if t.numel() == len(data) and not t[200:].any():
                raise RuntimeError("nvjpegDecode failed: 6 (corrupt stream)")
        return pil_decoder(tensors, device)

    six = scheme("six")
    ds = JpegCrops(jpeg_dataset, jpeg_dataset.samples, six, (32, 32), seed=0)
    gpu = make_gpu_decode_train_loader(ds, 8, 0, 1, seed=0, device=CPU,
                                       decoder=broken_decoder)
    with pytest.raises(ImageReadError) as e:
        next(iter(gpu))
    assert str(bad) in str(e.value) and "\n" not in str(e.value)

    bad.write_bytes(b"not a jpeg at all")
    cpu_ds = SegDataset(jpeg_dataset, jpeg_dataset.samples, six, (32, 32), raw=True)
    with pytest.raises(ImageReadError) as cpu_err:
        cpu_ds[3]
    with pytest.raises(DatasetError, match="is not one.*--decode cpu"):
        next(iter(make_gpu_decode_train_loader(
            JpegCrops(jpeg_dataset, jpeg_dataset.samples, six, (32, 32)), 8, 0, 1, seed=0,
            device=CPU, decoder=pil_decoder)))
    assert str(bad) in str(cpu_err.value) and "\n" not in str(cpu_err.value)


def test_non_jpeg_dataset_is_refused_at_start(coded_dataset):
    idx = discover(coded_dataset)  # lossless PNG images
    with pytest.raises(DatasetError, match=r"000\.png is not one.*launch/prepare.py"):
        check_jpeg_files(idx.samples)


def test_decode_field_and_its_start_up_check():
    assert DataConfig().decode == "cpu"
    with pytest.raises(ConfigError, match="data.decode = 'nvjpeg' is not valid"):
        DataConfig(decode="nvjpeg")
    with pytest.raises(ConfigError, match="loader 'torch'"):
        DataConfig(decode="gpu", loader="dali")
    from segcore.train.run import check_decode

    check_decode(DataConfig(decode="cpu"), CPU)  # nothing to check
    with pytest.raises(ConfigError) as e:
        check_decode(DataConfig(decode="gpu"), CPU)
    assert "--decode gpu needs a CUDA device" in str(e.value) and "\n" not in str(e.value)


def test_loader_throughput_counts_the_timed_batches_only(jpeg_dataset):
    gpu, cpu = loaders(jpeg_dataset, (32, 32), 0, 1, 0)
    for loader in (gpu, cpu):  # 4 batches an epoch: the timed ones span epochs
        res = loader_throughput(loader, batches=6, warmup=3, device=CPU)
        assert res["loader_batches"] == 6 and res["loader_images"] == 12
        assert res["loader_s"] > 0 and res["loader_img_s"] == 12 / res["loader_s"]


def test_prefetch_is_sized_from_the_cores():
    assert prefetch_factor(8, cores=16) == 4
    assert prefetch_factor(2, cores=16) == 8  # capped
    assert prefetch_factor(1, cores=2) == 4
    assert prefetch_factor(16, cores=4) == 2  # at least 2


def _spec(loaders, decodes):
    from segcore.sweep.grid import SweepSpec

    return SweepSpec(workers=[1], batch_sizes=[4], depths=[3], engines=["ddp"],
                     loaders=loaders, precisions=["fp32"], channels_last=[True],
                     axes={"data.decode": decodes})


def test_decodes_axis_leaves_out_a_decode_the_loader_does_not_take():
    """--loaders torch,dali --decodes cpu,gpu: DALI keeps its own decode (no dali x gpu
    job); a grid with nothing to run says why."""
    from segcore.sweep.grid import expand

    jobs = expand(_spec(["torch", "dali"], ["cpu", "gpu"]))
    got = sorted((j.config.data.loader, j.config.data.decode) for j in jobs)
    assert got == [("dali", "cpu"), ("torch", "cpu"), ("torch", "gpu")]
    assert any(j.run_id.endswith("-decodegpu") for j in jobs)
    with pytest.raises(ConfigError, match="applies to loader 'torch' only, not 'dali'"):
        expand(_spec(["dali"], ["gpu"]))


def test_sweep_decodes_flag_is_the_data_decode_axis():
    sweep = _launcher("sweep")
    assert sweep.axes([], ["cpu", "gpu"]) == {"data.decode": ["cpu", "gpu"]}
    with pytest.raises(ConfigError, match="name the same axis"):
        sweep.axes(["data.decode=gpu"], ["cpu"])
    with pytest.raises(SystemExit):
        sweep.parser().parse_args(["--decodes", "nvjpeg"])


def _launcher(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "launch" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_launcher", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_py_says_an_unreadable_image_in_one_line_also_from_a_worker(jpeg_dataset):
    bad = jpeg_dataset.samples[0].image
    bad.write_bytes(b"not a jpeg at all")
    ds = SegDataset(jpeg_dataset, jpeg_dataset.samples, scheme("six"), (32, 32), raw=True)
    with pytest.raises(ImageReadError) as e:  # raised in the worker: a traceback inside
        list(make_train_loader(ds, 8, 0, 1, seed=0, num_workers=1))
    line = _launcher("train")._image_error(e.value)
    assert line.startswith(f"{bad}: cannot decode") and "\n" not in line


def test_in_process_collate_equals_default_collate(jpeg_dataset):
    from torch.utils.data import default_collate

    from segcore.data.dataset import collate

    ds = SegDataset(jpeg_dataset, jpeg_dataset.samples, scheme("six"), (32, 32), raw=True)
    items = [ds[(0, i)] for i in range(4)]
    for got, want in zip(collate(items), default_collate(items)):
        assert got.dtype == want.dtype and torch.equal(got, want)
