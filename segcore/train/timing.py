"""Step timing: warm-up, CUDA events on a GPU (one host wait per window) or the host
clock on a CPU, data wait, throughput with a batch-means 95 % confidence interval, and
percentiles only where there are samples for them. Re-exported by
:mod:`segcore.train.telemetry`."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch


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
            ``wall_window_s`` (the same stretch, pauses included),
            ``wall_throughput_img_s`` (images / wall_window_s: the wall-clock rate),
            ``measured_time_share`` (the measured steps' time / wall_window_s),
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
        nan_keys = ("wall_s", "wall_window_s", "wall_throughput_img_s",
                    "measured_time_share", "throughput_img_s", "step_ms_p50", "step_ms_p90",
                    "step_ms_p99", "throughput_ci95_lo", "throughput_ci95_hi",
                    "throughput_ci95_pct", "step_ms_mean", "step_ms_std", "data_wait_pct",
                    "fwd_bwd_ms_p50", "optim_ms_p50")
        if n == 0:
            out.update({k: _NAN for k in nan_keys})
            return out
        step_ms = np.asarray(self._step_s, dtype=np.float64) * 1e3
        m = self._marks
        paused = sum(m.seconds(a, b) for a, b in self._pauses)
        window = m.seconds(self._first_begin, self._last_end)
        wall = window - paused
        out["wall_s"] = wall
        out["throughput_img_s"] = out["images"] / wall if wall > 0 else _NAN
        # The wall clock beside the steady state: the same images over the whole window,
        # epoch boundaries, loader restarts and checkpoint writes included.
        out["wall_window_s"] = window
        out["wall_throughput_img_s"] = out["images"] / window if window > 0 else _NAN
        out["measured_time_share"] = (float(sum(self._step_s)) / window if window > 0
                                      else _NAN)
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
