"""Memory and device telemetry: NVML sampling, host RSS (current, peak, reset), the
allocator peak, and peaks per training phase. Re-exported by
:mod:`segcore.train.telemetry`."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Iterator

import numpy as np
import torch

from segcore.train.timing import _as_device

_MIB = float(2 ** 20)
_NAN = float("nan")




# --------------------------------------------------------------------------- NVML


class NvmlSampler:
    """Sample GPU utilisation, power and device memory with NVML in a background thread.

    Usable as a context manager (the result lands in ``self.result``) or with
    :meth:`start` / :meth:`stop`. NVML problems never raise: without ``pynvml``, a
    driver or the device, ``available`` is False, ``error`` says why and :meth:`stop`
    returns the keys with ``None`` values (shown as empty cells in runs.csv).

    Args:
        device_index: the CUDA ordinal as torch sees it; it is mapped to the NVML
            device through the device UUID (or ``CUDA_VISIBLE_DEVICES``) because NVML
            enumerates all GPUs and ignores ``CUDA_VISIBLE_DEVICES``.
        interval_s: seconds between samples.
    """

    KEYS = ("gpu_util_pct", "power_w", "device_mem_mb")

    def __init__(self, device_index: int, interval_s: float = 0.1) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s = {interval_s!r} must be > 0")
        self.device_index = int(device_index)
        self.interval_s = float(interval_s)
        self.available = False
        self.error: str | None = None
        self.samples = 0
        self.result: dict[str, float | None] | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._util: list[float] = []
        self._power: list[float] = []
        self._mem: list[float] = []

    def __enter__(self) -> "NvmlSampler":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "NvmlSampler":
        """Initialise NVML and start sampling; a no-op sampler when NVML is unusable."""
        if self._thread is not None:
            raise RuntimeError("NvmlSampler.start() called twice")
        try:
            import pynvml  # imported lazily: optional, and absent on CPU-only installs

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded
            self.error = f"NVML unavailable: {type(e).__name__}: {e}"
            return self
        try:
            self._handle = _nvml_handle(self._nvml, self.device_index)
        except Exception as e:
            self.error = f"NVML device {self.device_index} unavailable: {type(e).__name__}: {e}"
            self._shutdown()
            return self
        self.available = True
        # One sample right away so that even a run shorter than interval_s has data.
        self._sample_once()
        self._stop_event.clear()
        # Daemon: a crashed training loop must not be kept alive by the sampler.
        self._thread = threading.Thread(target=self._run, name="NvmlSampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float | None]:
        """Stop sampling and summarise.

        Returns:
            ``{"gpu_util_pct": mean, "power_w": mean, "device_mem_mb": max used}``;
            a value is ``None`` when NVML or that particular counter is unavailable.
        """
        if self.result is not None:
            return dict(self.result)
        if self._thread is not None:
            self._stop_event.set()
            self._thread.join(timeout=max(5.0, 10 * self.interval_s))
            if self.available:
                self._sample_once()  # the last interval may hold the memory peak
        self._shutdown()
        self.result = {
            "gpu_util_pct": float(np.mean(self._util)) if self._util else None,
            "power_w": float(np.mean(self._power)) if self._power else None,
            "device_mem_mb": float(max(self._mem)) if self._mem else None,
        }
        return dict(self.result)

    def _run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self._sample_once()

    def _sample_once(self) -> None:
        nv, h = self._nvml, self._handle
        got = False
        # Each counter separately: some boards (e.g. MIG slices, some consumer cards)
        # do not support utilisation or power, and that must not hide the others.
        try:
            self._util.append(float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
            got = True
        except Exception:
            pass
        try:
            self._power.append(nv.nvmlDeviceGetPowerUsage(h) / 1000.0)  # mW -> W
            got = True
        except Exception:
            pass
        try:
            self._mem.append(nv.nvmlDeviceGetMemoryInfo(h).used / _MIB)
            got = True
        except Exception:
            pass
        self.samples += int(got)

    def _shutdown(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


def _nvml_handle(nv: Any, index: int) -> Any:
    """The NVML handle of the torch CUDA ordinal ``index``."""
    # NVML numbers all GPUs in PCI order regardless of CUDA_VISIBLE_DEVICES, so the torch
    # ordinal is matched by UUID when torch can tell it, then by the visible-devices list.
    try:
        if torch.cuda.is_available():
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
            return nv.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if index < len(entries):
            entry = entries[index]
            if entry.isdigit():
                return nv.nvmlDeviceGetHandleByIndex(int(entry))
            return nv.nvmlDeviceGetHandleByUUID(entry)
    return nv.nvmlDeviceGetHandleByIndex(index)


# --------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])  # "VmRSS:   123456 kB"
    except OSError:
        pass
    return None


def _ru_maxrss_mb() -> float:
    import resource

    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    # ru_maxrss is KiB on Linux but bytes on macOS.
    return peak / _MIB if sys.platform == "darwin" else peak / 1024.0


def host_rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib / 1024.0
    try:
        import psutil

        return psutil.Process().memory_info().rss / _MIB
    except Exception:
        # Last resort: the peak is an upper bound of the current value.
        return _ru_maxrss_mb()


def host_peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (VmHWM, else ``ru_maxrss``)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib / 1024.0
    return _ru_maxrss_mb()


def reset_host_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so a later peak covers only what follows.

    Linux only (writes ``5`` to ``/proc/self/clear_refs``); useful on CPU hosts to
    exclude dataset loading from the training peak.

    Returns:
        True when the reset succeeded.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def allocator_peak_mb(device: Any) -> float | None:
    """Peak memory allocated by the caching allocator on ``device`` in MiB.

    Returns:
        ``torch.cuda.max_memory_allocated`` for CUDA devices; ``None`` otherwise (the
        caller then falls back to :func:`host_peak_rss_mb` and records that it did).
    """
    dev = _as_device(device)
    if dev.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(dev) / _MIB


def reset_allocator_peak(device: Any) -> None:
    """Reset the allocator peak on a CUDA ``device`` (no-op elsewhere)."""
    dev = _as_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


class PhasePeaks:
    """Peak memory per phase of a run, so that one phase's peak does not pass for another's.

    Phases: ``warmup`` (set-up and warm-up steps: cuDNN autotuning workspaces, compile,
    allocator growth), ``train`` (steps after the warm-up: what a batch size or depth
    costs) and ``val`` (validation at full evaluation size). Entering a phase folds the
    running peak into the phase being left and resets the peak mark.

    CUDA: the caching allocator's peak (``max_memory_allocated``), in MiB. Elsewhere: the
    process's peak RSS (VmHWM, reset through ``/proc/self/clear_refs``) above
    ``baseline_mb``; RSS is a coarser measure (memory a phase freed may still be resident
    in the next).

    Args:
        device: the training device.
        baseline_mb: host RSS that is not the workload (imports, data, model), subtracted
            on the host path.
    """

    PHASES = ("warmup", "train", "val")

    def __init__(self, device: Any, baseline_mb: float = 0.0) -> None:
        self.device = _as_device(device)
        self.baseline_mb = float(baseline_mb)
        self.source = "allocator" if self.device.type == "cuda" else "host_peak_rss"
        self.phase: str | None = None
        self.peaks: dict[str, float] = {}

    def _current(self) -> float:
        alloc = allocator_peak_mb(self.device)
        if alloc is not None:
            return alloc
        return max(0.0, host_peak_rss_mb() - self.baseline_mb)

    def _reset(self) -> None:
        if self.device.type == "cuda":
            reset_allocator_peak(self.device)
        else:
            reset_host_peak_rss()

    def _fold(self) -> None:
        if self.phase is not None:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), self._current())

    def enter(self, phase: str | None) -> None:
        """Close the current phase and start ``phase`` (``None``: stop recording)."""
        if phase is not None and phase not in self.PHASES:
            raise ValueError(f"phase = {phase!r}; choose one of {', '.join(self.PHASES)}")
        if phase == self.phase:
            return
        self._fold()
        self._reset()
        self.phase = phase

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        """Record a nested phase (validation inside training), then return to the outer."""
        outer = self.phase
        self.enter(phase)
        try:
            yield
        finally:
            self.enter(outer)

    def result(self) -> dict[str, float | None]:
        """``{"warmup_mb", "train_mb", "val_mb", "overall_mb"}`` (None: phase not seen);
        the current phase's peak so far is included."""
        self._fold()
        out: dict[str, float | None] = {f"{p}_mb": self.peaks.get(p) for p in self.PHASES}
        seen = [v for v in self.peaks.values() if v is not None]
        out["overall_mb"] = max(seen) if seen else None
        return out
