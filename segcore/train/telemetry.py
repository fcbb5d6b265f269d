"""Measurement helpers: step timing, NVML sampling, memory, FLOP counts and MFU.

Everything here follows DESIGN.md section 5: warm up before the clock, time with CUDA
events on a GPU (the host is never made to wait for the device inside a measurement
window; one wait at its end), report throughput as images / wall time over the measured
steps, report the data-wait share separately, report memory per phase, both from the
allocator and from the device, and report MFU against both the datasheet peak and a
measured GEMM ceiling. Nothing here prints or keeps global state (the only module-level
object is a pure memoization cache for the measured matmul peak).

Units: ``*_mb`` values are MiB (2**20 bytes), like ``nvidia-smi`` and
``torch.cuda.max_memory_allocated() / 2**20``; times in ``*_ms`` are milliseconds.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import time
from typing import Any, Callable

import torch

from segcore.precision import DTYPES
# Re-exported: telemetry is the one import for measuring code.
from segcore.train.memory import (NvmlSampler, PhasePeaks, allocator_peak_mb,  # noqa: F401
                                  host_peak_rss_mb, host_rss_mb, reset_allocator_peak,
                                  reset_host_peak_rss)
from segcore.train.timing import (CudaEventMarks, HostMarks, StepTimer,  # noqa: F401
                                  _as_device, batch_means_ci, cuda_sync_fn, step_timer,
                                  t95)

__all__ = [
    "StepTimer",
    "HostMarks",
    "CudaEventMarks",
    "step_timer",
    "NvmlSampler",
    "cuda_sync_fn",
    "host_rss_mb",
    "host_peak_rss_mb",
    "reset_host_peak_rss",
    "allocator_peak_mb",
    "reset_allocator_peak",
    "train_flops_per_image",
    "forward_flops_per_image",
    "device_peak_tflops",
    "measured_gemm_tflops",
    "cuda_math",
    "set_cuda_math",
    "PhasePeaks",
    "mfu",
    "PEAK_TFLOPS_TABLE",
]

_MIB = float(2 ** 20)
_NAN = float("nan")




# --------------------------------------------------------------------------- FLOPs


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # Running DDP/DeepSpeed wrappers outside the training loop would fire gradient
    # all-reduce hooks on one rank only (and hang); count on the bare module instead.
    name = type(model).__name__
    if name in ("DistributedDataParallel", "DeepSpeedEngine", "DataParallel") \
            and isinstance(getattr(model, "module", None), torch.nn.Module):
        return model.module
    return model


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
    return torch.device("cpu"), torch.float32


def _scalar_of(out: Any) -> torch.Tensor:
    """Reduce a model output (tensor, or tuple/list/dict of tensors) to a scalar."""
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    parts = out.values() if isinstance(out, dict) else out
    return sum(_scalar_of(o) for o in parts if isinstance(o, (torch.Tensor, list, tuple, dict)))


def _count_flops(model: torch.nn.Module, input_shape: tuple[int, int, int],
                 backward: bool, loss_fn: Callable[[Any], torch.Tensor] | None) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape = {input_shape!r} must be (C, H, W) for one image")
    # A copy keeps the caller's model untouched: no stray .grad, no BatchNorm running
    # statistics moved by a fake batch.
    work = copy.deepcopy(_unwrap(model))
    _, dtype = _model_device_dtype(work)
    # On the meta device: shapes only, so counting costs neither compute nor memory.
    work = work.to("meta")
    device = torch.device("meta")
    work.train(backward)
    # The input does not require grad, as in training, so the first layer's input
    # gradient is (correctly) not counted.
    x = torch.randn(1, *tuple(int(s) for s in input_shape), device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        if backward:
            out = work(x)
            loss = loss_fn(out) if loss_fn is not None else _scalar_of(out)
            loss.backward()
        else:
            with torch.no_grad():
                work(x)
    return int(counter.get_total_flops())


def train_flops_per_image(model: torch.nn.Module, input_shape: tuple[int, int, int],
                          loss_fn: Callable[[Any], torch.Tensor] | None = None) -> int:
    """FLOPs of one training step (forward + backward) for ONE image.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions,
    a multiply-add = 2 FLOPs) on a deep copy of the model, so the model's gradients and
    buffers are left as they were. The optimizer step is not counted (negligible).

    Args:
        model: the bare model (DDP / DeepSpeed wrappers are unwrapped); call it before
            ZeRO-3 partitions the parameters.
        input_shape: ``(C, H, W)`` of one input image.
        loss_fn: optional ``loss_fn(output) -> scalar``; by default the output is summed
            (the loss adds no conv/matmul FLOPs, so the count is the same).

    Returns:
        FLOPs as an int (about 3x the forward count for conv nets: forward, input
        gradient and weight gradient).
    """
    return _count_flops(model, input_shape, backward=True, loss_fn=loss_fn)


def forward_flops_per_image(model: torch.nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs of one forward pass (eval mode, no grad) for ONE image of ``(C, H, W)``."""
    return _count_flops(model, input_shape, backward=False, loss_fn=None)


# --------------------------------------------------------------------------- peak / MFU

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA datasheets, per GPU.
# bf16/fp16 are tensor-core with fp32 accumulation (what PyTorch uses); "fp32" is the
# non-tensor-core rate; "tf32" the tensor-core rate used for fp32 convs by default.
# None means the format has no tensor-core support there (the fp32 rate applies).
# Order matters: the first entry whose pattern matches the device name wins, so more
# specific names (H100 NVL, H100 PCIe) come before the generic one.
PEAK_TFLOPS_TABLE: tuple[tuple[str, str, dict[str, float | None]], ...] = (
    (r"H200.*NVL", "H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H100.*NVL", "H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"H100.*PCI", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100", "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"L40S", "L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"V100.*PCI", "V100 PCIe", {"bf16": None, "fp16": 112.0, "tf32": None, "fp32": 14.0}),
    (r"V100", "V100 SXM2", {"bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7}),
    (r"RTX 4090", "RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090", "RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"\bT4\b", "T4", {"bf16": None, "fp16": 65.0, "tf32": None, "fp32": 8.1}),
)

_DTYPE_NAMES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
}


def _dtype_name(dtype: Any) -> str:
    key = dtype.lower() if isinstance(dtype, str) else dtype
    if key not in _DTYPE_NAMES:
        raise ValueError(f"dtype = {dtype!r} is not supported; choose one of "
                         "torch.float32/bfloat16/float16 or 'fp32', 'bf16', 'fp16'")
    return _DTYPE_NAMES[key]


def _table_peak(name: str, dt: str, tf32: bool) -> tuple[float, str] | None:
    for pattern, label, peaks in PEAK_TFLOPS_TABLE:
        if re.search(pattern, name, flags=re.IGNORECASE):
            fmt = "tf32" if (dt == "fp32" and tf32) else dt
            value = peaks.get(fmt)
            if value is None:  # no tensor-core path for this format on this GPU
                return float(peaks["fp32"]), f"table: {label} fp32 dense ({fmt} not native)"
            return float(value), f"table: {label} {fmt} dense"
    return None


def device_peak_tflops(device: Any, dtype: Any, tf32: bool | None = None) -> tuple[float, str]:
    """Peak dense TFLOP/s of one device for ``dtype``, and where the number comes from.

    Args:
        device: ``torch.device`` or string.
        dtype: ``torch.float32/bfloat16/float16`` or ``"fp32"/"bf16"/"fp16"``.
        tf32: for fp32 on CUDA, whether TF32 tensor cores are in use; ``None`` reads
            whether cuDNN convolutions use TF32 (:func:`cuda_math`), because a U-Net's
            FLOPs are almost all convolutions.

    Returns:
        ``(peak_tflops, source)``: a datasheet value for known GPUs (source
        ``"table: H100 SXM bf16 dense"``), else the best of a few timed square matmuls
        on the device (source ``"measured matmul NxN"``), memoized per device type,
        dtype and thread count.
    """
    dev = _as_device(device)
    dt = _dtype_name(dtype)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        use_tf32 = cuda_math()["tf32_conv"] if tf32 is None else bool(tf32)
        hit = _table_peak(name, dt, use_tf32)
        if hit is not None:
            return hit
    return measured_gemm_tflops(dev, dt)


def measured_gemm_tflops(device: Any, dtype: Any) -> tuple[float, str]:
    """What the device's fastest dense kernel reaches: a practical ceiling, memoized.

    A datasheet peak is rarely reached even by a GEMM (an H200 runs a large bf16 GEMM at
    ~790 of its 989 TFLOP/s), and a U-Net of 16-128 channels cannot feed the tensor cores
    the way a GEMM does, so MFU against the datasheet reads a few percent and looks like a
    bug. Against this ceiling it says how far the model is from what the device does in
    practice.

    CUDA: an 8192^3 matmul (fp32 under the current TF32 setting), timed with CUDA events
    over 10 repeats after a warm-up, best of 3. CPU: the better of a square matmul (grown
    from 256 until one product takes 50 ms, at most 2048) and a channels-last 3x3
    convolution of 64 channels (grown the same way), best of up to 5 each. The
    convolution is there because on a CPU the two run in different libraries: torch's
    matmul calls MKL's GEMM, convolutions call oneDNN, and on AMD EPYC (AVX-512) MKL's
    fp32 GEMM reached 187 GFLOP/s where oneDNN's channels-last convolution reached 396,
    so a U-Net step measured against the matmul alone read MFU 1.36. Both are measured in
    the calling process with its thread count (the step's own threads and load, since
    the rows measure it right after the run).

    Returns:
        ``(tflops, source)``, source like ``"measured matmul 8192x8192 bf16"`` or
        ``"measured conv3x3 64ch channels-last 8x64x128x128 fp32"``.
    """
    dev = _as_device(device)
    dt = _dtype_name(dtype)
    if dev.type == "cuda":
        dev_key = f"cuda:{torch.cuda.get_device_name(dev)}"
        tf32 = dt == "fp32" and cuda_math()["tf32_matmul"]
    else:
        dev_key, tf32 = dev.type, False
    tflops, n = _measured_matmul_tflops(dev_key, str(dev), dt, torch.get_num_threads(),
                                        tf32)
    source = f"measured matmul {n}x{n} {'tf32' if tf32 else dt}"
    if dev.type == "cpu":
        conv, shape = _measured_conv_tflops(str(dev), dt, torch.get_num_threads())
        if conv > tflops:
            return conv, f"measured conv3x3 64ch channels-last {shape} {dt}"
    return tflops, source


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _grow_and_time(make: Callable[[int], Callable[[], Any]], start: int, limit: int,
                   sync: Callable[[], None]) -> tuple[float, int]:
    """Grow a problem (doubling its size from ``start`` up to ``limit``) until one run
    takes 50 ms, then the best of up to 5 runs (0.5 s at most): a fixed size would take
    minutes where a precision is emulated (fp16/bf16 on CPUs without native support).

    Returns:
        ``(best seconds, size)``.
    """
    n = start
    while True:
        fn = make(n)
        _timed(fn, sync)  # warm-up: kernel selection, thread-pool start, caches
        t = _timed(fn, sync)
        if t >= 0.05 or n >= limit:
            break
        n *= 2
    best, spent = t, 0.0
    for _ in range(5):
        dt_s = _timed(fn, sync)
        best, spent = min(best, dt_s), spent + dt_s
        if spent > 0.5:
            break
    return best, n


@functools.lru_cache(maxsize=32)
def _measured_matmul_tflops(dev_key: str, device: str, dt: str,
                            threads: int, tf32: bool) -> tuple[float, int]:
    # dev_key, threads and tf32 are part of the cache key only: the peak depends on them.
    del dev_key, threads, tf32
    dev = torch.device(device)
    dtype = DTYPES[dt]
    if dev.type == "cuda":
        return _cuda_gemm_tflops(dev, dtype), _CUDA_GEMM_N
    sync = cuda_sync_fn(dev) or (lambda: None)

    def make(n: int) -> Callable[[], Any]:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
        return lambda: torch.matmul(a, b)

    best, n = _grow_and_time(make, 256, 2048, sync)
    return 2.0 * n ** 3 / best / 1e12, n


_CONV_CH, _CONV_BATCH = 64, 8


@functools.lru_cache(maxsize=32)
def _measured_conv_tflops(device: str, dt: str, threads: int) -> tuple[float, str]:
    """A 64->64 channel 3x3 convolution, channels-last, no bias, batch 8, forward only,
    on a side grown from 16 px (at most 256 px). ``threads`` is a cache key only."""
    del threads
    dev = torch.device(device)
    dtype = DTYPES[dt]
    conv = torch.nn.Conv2d(_CONV_CH, _CONV_CH, 3, padding=1, bias=False).to(
        device=dev, dtype=dtype, memory_format=torch.channels_last)

    def make(side: int) -> Callable[[], Any]:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(_CONV_BATCH, _CONV_CH, side, side, generator=gen).to(
            device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)

        def run() -> None:
            with torch.no_grad():
                conv(x)
        return run

    best, side = _grow_and_time(make, 16, 256, lambda: None)
    flops = 2.0 * _CONV_BATCH * _CONV_CH * _CONV_CH * 9 * side * side
    return flops / best / 1e12, f"{_CONV_BATCH}x{_CONV_CH}x{side}x{side}"


_CUDA_GEMM_N = 8192


def _cuda_gemm_tflops(dev: torch.device, dtype: torch.dtype, reps: int = 10) -> float:
    n = _CUDA_GEMM_N
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=dev, dtype=dtype)
    stream = torch.cuda.current_stream(dev)
    for _ in range(3):  # kernel selection, clocks ramping up
        torch.matmul(a, b, out=c)
    best = math.inf
    for _ in range(3):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        stop.record(stream)
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3 / reps)
    del a, b, c
    return 2.0 * n ** 3 / best / 1e12


# --------------------------------------------------------------------------- CUDA math


def _tf32_api_new() -> bool:
    """torch >= 2.9 sets TF32 per backend with ``fp32_precision`` (and refuses to read
    the legacy ``allow_tf32`` flags once the new API was used)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    return (hasattr(torch.backends.cuda.matmul, "fp32_precision")
            and hasattr(conv, "fp32_precision"))


def _effective_tf32(value: str, default: bool) -> bool:
    # "none" inherits from the parent (torch.backends.fp32_precision); "none" there too
    # means the legacy default: TF32 off for matmuls, on for cuDNN convolutions.
    if value == "none":
        value = getattr(torch.backends, "fp32_precision", "none")
    return default if value == "none" else value == "tf32"


def cuda_math() -> dict[str, Any]:
    """The CUDA math settings in force: what a row or a benchmark records.

    Returns:
        ``cudnn_benchmark``, ``tf32_matmul``, ``tf32_conv`` (bools) and ``tf32_api``
        (``"fp32_precision"`` or ``"allow_tf32"``).
    """
    out: dict[str, Any] = {"cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}
    if _tf32_api_new():
        out.update(tf32_matmul=_effective_tf32(torch.backends.cuda.matmul.fp32_precision,
                                               False),
                   tf32_conv=_effective_tf32(torch.backends.cudnn.conv.fp32_precision, True),
                   tf32_api="fp32_precision")
    else:
        out.update(tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
                   tf32_conv=bool(torch.backends.cudnn.allow_tf32), tf32_api="allow_tf32")
    return out


def set_cuda_math(tf32: bool = True, cudnn_benchmark: bool = True) -> dict[str, Any]:
    """Apply the training's CUDA math settings (run.py and the benchmarks alike).

    cuDNN autotuning picks the fastest convolution for each shape (the warm-up steps pay
    for it); TF32 runs fp32 matmuls and convolutions on tensor cores (Ampere and later).
    Uses ``fp32_precision`` on torch >= 2.9, the legacy ``allow_tf32`` flags before.

    Returns:
        :func:`cuda_math` after the change.
    """
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    if _tf32_api_new():
        value = "tf32" if tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = value
        torch.backends.cudnn.conv.fp32_precision = value
    else:
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)
    return cuda_math()


def mfu(throughput_img_s: float, flops_per_image: float, peak_tflops: float,
        n_devices: int = 1) -> tuple[float, float]:
    """Achieved TFLOP/s and model FLOPs utilisation.

    Args:
        throughput_img_s: images per second over all devices counted in ``n_devices``.
        flops_per_image: training FLOPs per image (:func:`train_flops_per_image`).
        peak_tflops: peak of ONE device (:func:`device_peak_tflops`).
        n_devices: devices that produced the throughput (the world size for a global
            throughput), so the peak scales with them.

    Returns:
        ``(tflops_achieved, mfu_fraction)``; NaN where an input is missing or the peak
        is not positive.
    """
    try:
        tput = float(throughput_img_s)
        flops = float(flops_per_image)
        peak = float(peak_tflops) * int(n_devices)
    except (TypeError, ValueError):
        return _NAN, _NAN
    achieved = tput * flops / 1e12
    if not math.isfinite(achieved):
        return _NAN, _NAN
    frac = achieved / peak if (math.isfinite(peak) and peak > 0) else _NAN
    return achieved, frac
