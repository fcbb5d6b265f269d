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

import contextlib
import copy
import functools
import math
import os
import re
import sys
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

from segcore.precision import DTYPES

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


# --------------------------------------------------------------------------- step timer


class HostMarks:
    """Timestamps from a host clock.

    CPU work is synchronous, so there the host clock is the device clock. With ``sync``
    (``cuda_sync_fn``) every mark first waits for the whole device: the per-step timing
    that keeps a GPU from running ahead of the host, kept only to put a number on that
    effect (``bench/gpu_check.py``).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 sync: Callable[[], None] | None = None) -> None:
        self.clock, self.sync = clock, sync
        self.kind = "host_clock_synced" if sync is not None else "host_clock"

    def mark(self) -> float:
        if self.sync is not None:
            self.sync()
        return float(self.clock())

    def done(self, token: float) -> bool:
        return True

    def wait(self, token: float) -> None:
        pass

    def seconds(self, start: float, end: float) -> float:
        return end - start


class CudaEventMarks:
    """Timestamps as CUDA events on the current stream: nothing waits when a mark is set.

    The host keeps queueing kernels while the GPU works through earlier ones; an event
    records when the GPU *reaches* it in stream order, so the time between two events is
    what the GPU spent on the work between them, idle gaps (waiting for the host or the
    data) included. Events are read after one wait on the last of them
    (:meth:`StepTimer.summary`), not at every step.
    """

    kind = "cuda_events"

    def __init__(self, device: Any) -> None:
        self.device = _as_device(device)

    def mark(self) -> Any:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def done(self, token: Any) -> bool:
        return bool(token.query())

    def wait(self, token: Any) -> None:
        token.synchronize()  # this event only: not a device-wide synchronize

    def seconds(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end)) / 1e3


class StepTimer:
    """Time training steps in four phases, excluding the first ``warmup_steps`` steps.

    Per step the caller marks::

        t.begin()          # before fetching the batch
        t.data_ready()     # batch is on the device
        t.compute_done()   # forward + backward finished
        t.end(n_images)    # optimizer step finished

    so that ``fwd_bwd = compute_done - data_ready``, ``optim = end - compute_done`` and
    ``step = end - begin`` on the device's timeline (``marks``), and ``data wait`` is the
    host time from ``begin`` to ``data_ready``: how long the host was blocked on the next
    batch. ``data_ready`` and ``compute_done`` are optional; a phase whose marks a step
    skipped is NaN for that step and left out of that phase's statistics.

    On a CPU the marks are host timestamps. On a GPU they are CUDA events
    (:class:`CudaEventMarks`, see :func:`step_timer`): the host runs ahead as it does
    without a timer, and the events are read once, at :meth:`summary`.

    Args:
        warmup_steps: number of leading steps that are counted but excluded from every
            statistic (compilation, cuDNN autotuning and allocator growth happen there).
        sync: called before every host timestamp (the legacy per-step synchronized
            timing, e.g. ``cuda_sync_fn(device)``); ``None`` for none. Only with the
            default host ``marks``.
        clock: monotonic host clock in seconds; injectable so tests can use a fake clock.
        marks: the device timeline (:class:`HostMarks` or :class:`CudaEventMarks`, or any
            object with ``mark/done/wait/seconds``); ``None``: the host clock.
    """

    # Steps whose events are kept unread before the timer reads the finished ones (a
    # non-blocking query): bounds the events alive in a long accuracy run.
    RESOLVE_EVERY = 512

    def __init__(self, warmup_steps: int, sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 marks: Any = None) -> None:
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) \
                or warmup_steps < 0:
            raise ValueError(f"warmup_steps = {warmup_steps!r} must be an integer >= 0")
        if marks is not None and sync is not None:
            raise ValueError("StepTimer: pass sync= (host clock) or marks=, not both")
        self.warmup_steps = warmup_steps
        self._clock = clock
        # On the host clock the device marks are the host timestamps: one clock read.
        self._host_is_device = marks is None
        self._marks = marks if marks is not None else HostMarks(clock, sync)
        self.steps = 0  # completed steps, warm-up included
        # Resolved, per measured step (parallel lists); NaN where a mark was skipped.
        self._step_s: list[float] = []
        self._data_s: list[float] = []
        self._fwd_bwd_s: list[float] = []
        self._optim_s: list[float] = []
        self._images: list[int] = []
        # Measured steps whose device marks are not read yet:
        # (begin, data, compute, end, host data wait s, images).
        self._unread: list[tuple[Any, Any, Any, Any, float, int]] = []
        self._first_begin: Any = None
        self._last_end: Any = None
        self._pauses: list[tuple[Any, Any]] = []  # between measured steps
        self._pending_pauses: list[tuple[Any, Any]] = []  # counted once a later step ends
        self._t_begin: Any = None
        self._t_data: Any = None
        self._t_compute: Any = None
        self._h_begin = 0.0
        self._h_data = _NAN

    @property
    def method(self) -> str:
        """How steps are timed: ``host_clock``, ``host_clock_synced`` or ``cuda_events``."""
        return str(self._marks.kind)

    # -- marks -------------------------------------------------------------------------

    def _host_now(self) -> float:
        return float(self._clock())

    def begin(self) -> None:
        """Mark the start of a step (before the batch is fetched)."""
        if self._t_begin is not None:
            raise RuntimeError("StepTimer.begin() called twice without end()")
        self._t_begin = self._marks.mark()
        self._h_begin = self._t_begin if self._host_is_device else self._host_now()
        self._t_data = None
        self._t_compute = None
        self._h_data = _NAN

    def data_ready(self) -> None:
        """Mark that the batch is on the device (its copy queued, on a GPU)."""
        self._require_open("data_ready")
        self._t_data = self._marks.mark()
        self._h_data = self._t_data if self._host_is_device else self._host_now()

    def compute_done(self) -> None:
        """Mark that forward and backward have finished (been queued, on a GPU)."""
        self._require_open("compute_done")
        self._t_compute = self._marks.mark()

    def end(self, n_images: int) -> None:
        """Mark the end of a step (after the optimizer step).

        Args:
            n_images: images processed by this step (global batch for a global timer,
                local batch for a per-rank timer).
        """
        self._require_open("end")
        t_end = self._marks.mark()
        t0, td, tc = self._t_begin, self._t_data, self._t_compute
        self._t_begin = None
        # Counting before the comparison is what makes warm-up exclusion work; a counter
        # that is never advanced silently measures the warm-up steps too.
        self.steps += 1
        if self.steps <= self.warmup_steps:
            return
        if self._first_begin is None:
            self._first_begin = t0
        self._last_end = t_end
        self._pauses.extend(self._pending_pauses)
        self._pending_pauses = []
        wait = self._h_data - self._h_begin if td is not None else _NAN
        self._unread.append((t0, td, tc, t_end, wait, int(n_images)))
        if len(self._unread) >= self.RESOLVE_EVERY:
            self._read(block=False)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Exclude a stretch between steps (validation, checkpointing) from ``wall_s``.

        Without it a run that validates every epoch would report a training throughput
        diluted by evaluation time. On a GPU the stretch is measured on the device's
        timeline too, so work queued before the pause still counts as training.
        """
        if self._t_begin is not None:
            raise RuntimeError("StepTimer.paused() inside an open step")
        t0 = self._marks.mark()
        try:
            yield
        finally:
            if self._first_begin is not None:
                self._pending_pauses.append((t0, self._marks.mark()))

    def _require_open(self, name: str) -> None:
        if self._t_begin is None:
            raise RuntimeError(f"StepTimer.{name}() called before begin()")

    def _read(self, block: bool) -> None:
        """Turn device marks into seconds: all of them (``block``: one wait, on the last
        mark), or, without blocking, those of the steps the device has finished."""
        m = self._marks
        if block and self._unread:
            m.wait(self._unread[-1][3])
        n = 0
        for t0, td, tc, te, wait, images in self._unread:
            if not block and not m.done(te):
                break
            self._step_s.append(m.seconds(t0, te))
            self._data_s.append(wait)
            # Without data_ready the compute phase has no start, so it is left unknown
            # rather than silently including the data wait.
            self._fwd_bwd_s.append(m.seconds(td, tc) if (tc is not None and td is not None)
                                   else _NAN)
            self._optim_s.append(m.seconds(tc, te) if tc is not None else _NAN)
            self._images.append(images)
            n += 1
        del self._unread[:n]

    # -- results -----------------------------------------------------------------------

    @property
    def measured_steps(self) -> int:
        """Steps completed after the warm-up."""
        return len(self._step_s) + len(self._unread)

    @property
    def in_warmup(self) -> bool:
        """True while the next completed step would still be a warm-up step."""
        return self.steps < self.warmup_steps

    def step_times_ms(self) -> list[float]:
        """Measured step times in milliseconds, in order (e.g. for plots or repeats).
        On a GPU this waits for the last measured step to finish."""
        self._read(block=True)
        return [s * 1e3 for s in self._step_s]

    def summary(self) -> dict[str, Any]:
        """Statistics over the measured steps.

        Returns:
            dict with ``warmup_steps`` (warm-up steps actually completed),
            ``measured_steps``, ``images`` (measured), ``wall_s`` (begin of the first
            measured step to end of the last, so gaps between steps count, less the
            stretches inside :meth:`paused`),
            ``throughput_img_s`` (= images / wall_s, not a mean of per-step rates) with
            its 95 % interval (:func:`batch_means_ci`), ``step_ms_p50/p90/p99`` (each
            NaN below :data:`PERCENTILE_MIN_SAMPLES` steps), ``step_ms_mean``,
            ``step_ms_std`` (sample std, 0 for one step), ``data_wait_pct`` (sum of data waits / sum of step times
            * 100), ``fwd_bwd_ms_p50``, ``optim_ms_p50`` and ``timing_method``
            (:attr:`method`). Statistics are NaN when there are no measured steps or the
            phase was never marked. On a GPU this is the window's one wait for the device
            (on the last step's event).
        """
        self._read(block=True)
        n = self.measured_steps
        out: dict[str, Any] = {
            "warmup_steps": min(self.steps, self.warmup_steps),
            "measured_steps": n,
            "images": int(sum(self._images)),
            "timing_method": self.method,
        }
        nan_keys = ("wall_s", "throughput_img_s", "step_ms_p50", "step_ms_p90",
                    "step_ms_p99", "throughput_ci95_lo", "throughput_ci95_hi",
                    "throughput_ci95_pct", "step_ms_mean", "step_ms_std", "data_wait_pct",
                    "fwd_bwd_ms_p50", "optim_ms_p50")
        if n == 0:
            out.update({k: _NAN for k in nan_keys})
            return out
        step_ms = np.asarray(self._step_s, dtype=np.float64) * 1e3
        m = self._marks
        paused = sum(m.seconds(a, b) for a, b in self._pauses)
        wall = m.seconds(self._first_begin, self._last_end) - paused
        out["wall_s"] = wall
        out["throughput_img_s"] = out["images"] / wall if wall > 0 else _NAN
        # A tail percentile from a handful of samples is the maximum in disguise: each
        # is reported only with enough samples for it (PERCENTILE_MIN_SAMPLES).
        for q, need in PERCENTILE_MIN_SAMPLES.items():
            out[f"step_ms_p{q}"] = float(np.percentile(step_ms, q)) if n >= need else _NAN
        out.update(batch_means_ci(np.asarray(self._images, dtype=np.float64),
                                  np.asarray(self._step_s, dtype=np.float64),
                                  out["throughput_img_s"]))
        out["step_ms_mean"] = float(step_ms.mean())
        out["step_ms_std"] = float(step_ms.std(ddof=1)) if n > 1 else 0.0
        data = np.asarray(self._data_s, dtype=np.float64)
        marked = ~np.isnan(data)
        step_s = np.asarray(self._step_s, dtype=np.float64)
        # Share over the steps that marked data_ready, so an unmarked step does not
        # dilute the share with compute time that has no data wait recorded.
        denom = float(step_s[marked].sum())
        out["data_wait_pct"] = (float(data[marked].sum()) / denom * 100.0
                                if marked.any() and denom > 0 else _NAN)
        out["fwd_bwd_ms_p50"] = _nan_median_ms(self._fwd_bwd_s)
        out["optim_ms_p50"] = _nan_median_ms(self._optim_s)
        return out


# Fewest measured steps for each step-time percentile to be reported (else NaN).
PERCENTILE_MIN_SAMPLES = {50: 1, 90: 20, 99: 100}
MAX_CI_BATCHES = 10
# Two-sided 95 % Student t critical values by degrees of freedom (1.96 beyond 30).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
        2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069,
        2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df: int) -> float:
    """Two-sided 95 % critical value of Student's t with ``df`` degrees of freedom."""
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


def batch_means_ci(images: np.ndarray, step_s: np.ndarray,
                   throughput: float) -> dict[str, Any]:
    """95 % confidence interval of a throughput by the method of batch means.

    The measured steps are cut into up to :data:`MAX_CI_BATCHES` consecutive batches of
    equal length (at least 3 steps each, so neighbouring steps' correlation mostly stays
    inside a batch); each batch's throughput is images / time; the interval is
    ``t95(k-1) * sd / sqrt(k)`` around their mean, applied as a relative half-width to
    ``throughput``. Fewer than 2 batches: no interval (NaN).

    Returns:
        ``throughput_ci95_lo``, ``throughput_ci95_hi``, ``throughput_ci95_pct`` (half-width
        in % of the throughput) and ``ci_batches``.
    """
    n = len(step_s)
    k = min(MAX_CI_BATCHES, n // 3)
    out: dict[str, Any] = {"throughput_ci95_lo": _NAN, "throughput_ci95_hi": _NAN,
                           "throughput_ci95_pct": _NAN, "ci_batches": max(k, 0)}
    if k < 2 or not math.isfinite(throughput):
        out["ci_batches"] = 0
        return out
    size = n // k
    cut = [slice(i * size, (i + 1) * size) for i in range(k)]
    rates = np.array([images[s].sum() / step_s[s].sum() for s in cut])
    half = t95(k - 1) * rates.std(ddof=1) / math.sqrt(k) / rates.mean()
    out.update(throughput_ci95_lo=throughput * (1 - half),
               throughput_ci95_hi=throughput * (1 + half), throughput_ci95_pct=half * 100.0)
    return out


def _nan_median_ms(values_s: list[float]) -> float:
    arr = np.asarray(values_s, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(np.median(arr) * 1e3) if arr.size else _NAN


def step_timer(warmup_steps: int, device: Any, per_step_sync: bool = False) -> StepTimer:
    """The step timer for ``device``.

    CUDA: CUDA events on the current stream (:class:`CudaEventMarks`), so the host runs
    ahead of the GPU as it does untimed; ``per_step_sync`` instead synchronizes the device
    at every mark (the old behaviour, which understates a small configuration's
    throughput: only for measuring that). Elsewhere: the host clock.
    """
    dev = _as_device(device)
    if dev.type != "cuda":
        return StepTimer(warmup_steps)
    if per_step_sync:
        return StepTimer(warmup_steps, sync=cuda_sync_fn(dev))
    return StepTimer(warmup_steps, marks=CudaEventMarks(dev))


def cuda_sync_fn(device: Any) -> Callable[[], None] | None:
    """A zero-argument synchronize for ``device``, to pass as ``StepTimer(sync=...)``.

    Args:
        device: ``torch.device``, string such as ``"cuda:1"``, or CUDA ordinal.

    Returns:
        ``torch.cuda.synchronize`` bound to the device for CUDA devices, else ``None``
        (CPU work is synchronous, so no synchronize is needed).
    """
    dev = _as_device(device)
    if dev.type != "cuda":
        return None
    return functools.partial(torch.cuda.synchronize, dev)


def _as_device(device: Any) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


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
    """What a large dense matmul reaches on this device: a practical ceiling, memoized.

    A datasheet peak is rarely reached even by a GEMM (an H200 runs a large bf16 GEMM at
    ~790 of its 989 TFLOP/s), and a U-Net of 16-128 channels cannot feed the tensor cores
    the way a GEMM does, so MFU against the datasheet reads a few percent and looks like a
    bug. Against this ceiling it says how far the model is from what the device does in
    practice.

    CUDA: an 8192^3 matmul (fp32 under the current TF32 setting), timed with CUDA events
    over 10 repeats after a warm-up, best of 3. CPU: grown from 256 until one product
    takes 50 ms (at most 2048), best of up to 5.

    Returns:
        ``(tflops, source)``, source like ``"measured matmul 8192x8192 bf16"``.
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
    return tflops, f"measured matmul {n}x{n} {'tf32' if tf32 else dt}"


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
    n_max = 2048

    def timed(a: torch.Tensor, b: torch.Tensor) -> float:
        sync()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        return time.perf_counter() - t0

    # Grow the matrix until one product takes long enough to time reliably; a fixed
    # size would take minutes for fp16 on CPUs without native fp16 matmul.
    n = 256
    while True:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
        timed(a, b)  # warm-up: kernel selection, thread-pool start, caches
        t = timed(a, b)
        if t >= 0.05 or n >= n_max:
            break
        n *= 2
    best = t
    spent = 0.0
    for _ in range(5):
        dt_s = timed(a, b)
        best = min(best, dt_s)
        spent += dt_s
        if spent > 0.5:
            break
    return 2.0 * n ** 3 / best / 1e12, n


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
