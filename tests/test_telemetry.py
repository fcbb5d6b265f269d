"""Unit tests of segcore.telemetry: the timing harness is tested like any other code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from segcore.train import telemetry
from segcore.train.telemetry import (NvmlSampler, StepTimer, allocator_peak_mb, cuda_sync_fn,
                               device_peak_tflops, forward_flops_per_image,
                               host_peak_rss_mb, host_rss_mb, mfu, train_flops_per_image)


class FakeClock:
    """A clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def run_step(timer: StepTimer, clock: FakeClock, data: float, fwd_bwd: float,
             optim: float, n: int, gap: float = 0.0) -> None:
    timer.begin()
    clock.advance(data)
    timer.data_ready()
    clock.advance(fwd_bwd)
    timer.compute_done()
    clock.advance(optim)
    timer.end(n)
    clock.advance(gap)  # time between steps (logging, checkpoint...) counts in wall


def test_warmup_steps_are_excluded():
    clock = FakeClock()
    timer = StepTimer(warmup_steps=3, clock=clock)
    for _ in range(3):  # slow warm-up: would dominate every statistic if counted
        assert timer.in_warmup
        run_step(timer, clock, data=1.0, fwd_bwd=5.0, optim=1.0, n=8)
    assert not timer.in_warmup
    for _ in range(4):
        run_step(timer, clock, data=0.001, fwd_bwd=0.008, optim=0.001, n=8)
    s = timer.summary()
    assert timer.steps == 7
    assert s["warmup_steps"] == 3
    assert s["measured_steps"] == 4
    assert s["images"] == 32
    assert s["wall_s"] == pytest.approx(0.040)
    assert s["step_ms_p50"] == pytest.approx(10.0)  # the 5 s warm-up steps are not in it
    assert s["throughput_img_s"] == pytest.approx(32 / 0.040)


def test_warmup_zero_measures_every_step():
    clock = FakeClock()
    timer = StepTimer(warmup_steps=0, clock=clock)
    run_step(timer, clock, 0.0, 0.01, 0.0, n=2)
    assert timer.summary()["measured_steps"] == 1


def test_throughput_is_images_over_wall_not_mean_of_rates():
    clock = FakeClock()
    timer = StepTimer(warmup_steps=1, clock=clock)
    run_step(timer, clock, 0.5, 0.5, 0.5, n=4, gap=0.3)  # warm-up
    durations = [0.010, 0.030, 0.100]
    batch = [4, 4, 2]
    for d, n in zip(durations, batch):
        run_step(timer, clock, data=0.0, fwd_bwd=d, optim=0.0, n=n, gap=0.005)
    s = timer.summary()
    # Wall spans begin of the first measured step to end of the last: the gaps between
    # measured steps count, the gap after the last one does not.
    wall = sum(durations) + 0.005 * 2
    assert s["wall_s"] == pytest.approx(wall)
    assert s["throughput_img_s"] == pytest.approx(sum(batch) / wall)
    mean_of_rates = np.mean([n / d for n, d in zip(batch, durations)])
    assert not math.isclose(s["throughput_img_s"], mean_of_rates, rel_tol=0.05)


def test_percentiles_mean_std_match_numpy():
    rng = np.random.default_rng(0)
    step_s = rng.uniform(0.01, 0.2, size=120)  # enough samples for every percentile
    clock = FakeClock()
    timer = StepTimer(warmup_steps=2, clock=clock)
    for d in [1.0, 1.0, *step_s]:
        run_step(timer, clock, data=0.0, fwd_bwd=d, optim=0.0, n=1)
    s = timer.summary()
    ms = step_s * 1e3
    for q in (50, 90, 99):
        assert s[f"step_ms_p{q}"] == pytest.approx(np.percentile(ms, q))
    assert s["step_ms_mean"] == pytest.approx(ms.mean())
    assert s["step_ms_std"] == pytest.approx(ms.std(ddof=1))
    assert timer.step_times_ms() == pytest.approx(list(ms))


def test_data_wait_share_and_phase_medians():
    clock = FakeClock()
    timer = StepTimer(warmup_steps=0, clock=clock)
    # data waits 10, 30, 0 ms; steps 50, 70, 40 ms -> share 40 / 160
    run_step(timer, clock, data=0.010, fwd_bwd=0.030, optim=0.010, n=1)
    run_step(timer, clock, data=0.030, fwd_bwd=0.030, optim=0.010, n=1)
    run_step(timer, clock, data=0.000, fwd_bwd=0.020, optim=0.020, n=1)
    s = timer.summary()
    assert s["data_wait_pct"] == pytest.approx(40 / 160 * 100)
    assert s["fwd_bwd_ms_p50"] == pytest.approx(30.0)
    assert s["optim_ms_p50"] == pytest.approx(10.0)


def test_zero_measured_steps_gives_counts_and_nan():
    clock = FakeClock()
    timer = StepTimer(warmup_steps=5, clock=clock)
    for _ in range(3):
        run_step(timer, clock, 0.01, 0.01, 0.01, n=4)
    s = timer.summary()
    assert s["warmup_steps"] == 3 and s["measured_steps"] == 0 and s["images"] == 0
    for key in ("wall_s", "throughput_img_s", "step_ms_p50", "step_ms_p90", "step_ms_p99",
                "step_ms_mean", "step_ms_std", "data_wait_pct", "fwd_bwd_ms_p50",
                "optim_ms_p50"):
        assert math.isnan(s[key]), key


def test_sync_is_called_before_every_mark():
    calls: list[float] = []
    clock = FakeClock()
    timer = StepTimer(warmup_steps=0, sync=lambda: calls.append(clock.t), clock=clock)
    run_step(timer, clock, 0.01, 0.01, 0.01, n=1)
    assert len(calls) == 4


def test_optional_marks_and_misuse():
    clock = FakeClock()
    timer = StepTimer(warmup_steps=0, clock=clock)
    timer.begin()
    clock.advance(0.02)
    timer.end(3)  # no data_ready / compute_done: phases unknown, step still counted
    s = timer.summary()
    assert s["step_ms_p50"] == pytest.approx(20.0)
    assert math.isnan(s["data_wait_pct"]) and math.isnan(s["fwd_bwd_ms_p50"])
    with pytest.raises(RuntimeError):
        timer.end(1)
    with pytest.raises(RuntimeError):
        timer.data_ready()
    timer.begin()
    with pytest.raises(RuntimeError):
        timer.begin()
    with pytest.raises(ValueError):
        StepTimer(warmup_steps=-1)


def test_cuda_sync_fn():
    assert cuda_sync_fn("cpu") is None
    assert cuda_sync_fn(torch.device("cpu")) is None
    assert callable(cuda_sync_fn("cuda:0"))  # built, not called: no GPU needed


def test_nvml_sampler_never_raises():
    with NvmlSampler(0, interval_s=0.01) as sampler:
        pass
    result = sampler.result
    assert set(result) == {"gpu_util_pct", "power_w", "device_mem_mb"}
    if sampler.available:
        assert result["device_mem_mb"] is not None and result["device_mem_mb"] > 0
    else:
        assert sampler.error
        assert all(v is None for v in result.values())
    assert sampler.stop() == result  # idempotent


def test_nvml_sampler_unavailable_without_driver():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this host has an NVIDIA driver")
    except Exception:
        pass
    sampler = NvmlSampler(3).start()
    assert sampler.available is False
    assert sampler.stop() == {"gpu_util_pct": None, "power_w": None, "device_mem_mb": None}


def test_host_memory():
    rss = host_rss_mb()
    peak = host_peak_rss_mb()
    assert rss > 0
    assert peak >= rss * 0.999
    assert allocator_peak_mb("cpu") is None
    telemetry.reset_allocator_peak("cpu")  # no-op on CPU


def conv_flops(cin: int, cout: int, k: int, h: int, w: int) -> int:
    return 2 * cin * cout * k * k * h * w


def test_flops_single_conv_matches_analytic():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    fwd = conv_flops(3, 8, 3, 32, 32)
    assert forward_flops_per_image(conv, (3, 32, 32)) == fwd
    # The input needs no gradient, so backward is the weight gradient only (= forward).
    assert train_flops_per_image(conv, (3, 32, 32)) == 2 * fwd
    assert conv.weight.grad is None and conv.bias.grad is None


def test_flops_two_convs_backward_is_twice_forward_after_first_layer():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1))
    model.eval()
    before = model[1].running_mean.clone()
    f1, f2 = conv_flops(3, 8, 3, 16, 16), conv_flops(8, 4, 3, 16, 16)
    assert forward_flops_per_image(model, (3, 16, 16)) == f1 + f2
    assert train_flops_per_image(model, (3, 16, 16)) == (f1 + f2) + f1 + 2 * f2
    # The caller's model is untouched: no grads, same BN statistics, same mode.
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model[1].running_mean, before)
    assert not model.training


def test_flops_custom_loss_and_bad_shape():
    conv = nn.Conv2d(2, 2, 1)
    n = train_flops_per_image(conv, (2, 8, 8), loss_fn=lambda out: (out ** 2).mean())
    assert n == 2 * conv_flops(2, 2, 1, 8, 8)
    with pytest.raises(ValueError):
        train_flops_per_image(conv, (1, 2, 8, 8))


def test_device_peak_cpu_is_measured_and_cached():
    peak, source = device_peak_tflops("cpu", torch.float32)
    assert peak > 0 and math.isfinite(peak)
    assert source.startswith(("measured matmul ", "measured conv3x3 "))
    assert device_peak_tflops("cpu", "fp32") == (peak, source)  # memoized
    with pytest.raises(ValueError):
        device_peak_tflops("cpu", torch.int8)


@pytest.mark.parametrize("name,dtype,tf32,expected,label", [
    ("NVIDIA H100 80GB HBM3", "bf16", True, 989.4, "H100 SXM bf16"),
    ("NVIDIA H100 PCIe", "fp16", True, 756.5, "H100 PCIe fp16"),
    ("NVIDIA H200", "bf16", True, 989.4, "H200 SXM bf16"),
    ("NVIDIA A100-SXM4-80GB", "fp32", True, 156.0, "A100 tf32"),
    ("NVIDIA A100-SXM4-80GB", "fp32", False, 19.5, "A100 fp32"),
    ("NVIDIA A10", "bf16", True, 125.0, "A10 bf16"),
    ("NVIDIA L4", "bf16", True, 121.0, "L4 bf16"),
    ("NVIDIA L40S", "bf16", True, 362.1, "L40S bf16"),
    ("Tesla V100-SXM2-16GB", "bf16", True, 15.7, "V100 SXM2 fp32"),
    ("Tesla T4", "fp16", True, 65.0, "T4 fp16"),
    ("NVIDIA GeForce RTX 4090", "bf16", True, 165.2, "RTX 4090 bf16"),
])
def test_peak_table(monkeypatch, name, dtype, tf32, expected, label):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    peak, source = device_peak_tflops("cuda:0", dtype, tf32=tf32)
    assert peak == pytest.approx(expected)
    assert source.startswith("table: ") and label in source


def test_peak_table_does_not_confuse_similar_names():
    assert telemetry._table_peak("NVIDIA A10G", "bf16", True) is None
    assert telemetry._table_peak("NVIDIA L40", "bf16", True) is None
    assert telemetry._table_peak("Some Future GPU", "bf16", True) is None


def test_mfu_arithmetic():
    tflops, frac = mfu(100.0, 1e10, 4.0)
    assert tflops == pytest.approx(1.0) and frac == pytest.approx(0.25)
    tflops, frac = mfu(100.0, 1e10, 4.0, n_devices=2)
    assert tflops == pytest.approx(1.0) and frac == pytest.approx(0.125)
    assert math.isnan(mfu(100.0, 1e10, 0.0)[1])
    assert all(math.isnan(v) for v in mfu(float("nan"), 1e10, 4.0))
    assert all(math.isnan(v) for v in mfu(None, 1e10, 4.0))


def test_paused_stretches_are_excluded_from_wall_time():
    from segcore.train.telemetry import StepTimer

    now = [0.0]
    t = StepTimer(warmup_steps=1, clock=lambda: now[0])
    for i in range(4):
        t.begin()
        now[0] += 1.0
        t.end(2)
        with t.paused():  # e.g. validation after every step
            now[0] += 10.0
    s = t.summary()
    # 3 measured steps of 1 s; the pauses between them do not count.
    assert s["measured_steps"] == 3
    assert s["wall_s"] == pytest.approx(3.0)
    assert s["throughput_img_s"] == pytest.approx(2.0)


# --------------------------------------------------------------------------- GPU-true timing


class FakeGpu:
    """A device that runs queued work in order while the host goes on: the CUDA stream
    model. ``launch(d)`` queues ``d`` seconds of device work (the host does not wait);
    ``mark()`` is an event, reached when the device has done everything queued before it;
    ``sync()`` makes the host wait for the device (``torch.cuda.synchronize``)."""

    kind = "fake_events"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.free_at = clock.t  # when the device finishes the work queued so far
        self.waits = 0
        self.syncs = 0

    def launch(self, seconds: float) -> None:
        self.free_at = max(self.free_at, self.clock.t) + seconds

    def mark(self) -> float:
        return max(self.free_at, self.clock.t)

    def done(self, token: float) -> bool:
        return token <= self.clock.t

    def wait(self, token: float) -> None:
        self.waits += 1
        self.clock.t = max(self.clock.t, token)

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def sync(self) -> None:
        self.syncs += 1
        self.clock.t = max(self.clock.t, self.free_at)


def gpu_steps(timer: StepTimer, clock: FakeClock, gpu: FakeGpu, n_steps: int, batch: int,
              host_launch: float, device_work: float, data_wait: float = 0.0) -> None:
    """Training steps as the Trainer marks them: the host spends ``host_launch`` queueing
    ``device_work`` of kernels per step, after ``data_wait`` blocked on the loader."""
    for _ in range(n_steps):
        timer.begin()
        clock.advance(data_wait)
        timer.data_ready()
        clock.advance(host_launch / 2)
        gpu.launch(device_work * 0.8)  # forward + backward
        timer.compute_done()
        clock.advance(host_launch / 2)
        gpu.launch(device_work * 0.2)  # optimizer step
        timer.end(batch)


def test_events_let_the_gpu_run_ahead_and_sync_once():
    """A small configuration: 1 ms of host launch work and 4 ms of GPU work a step. The
    GPU sets the pace (4 ms); a device-wide synchronize at every mark serializes host and
    device (5 ms), understating throughput by 20 % here and up to 2x when the two match."""
    clock = FakeClock()
    gpu = FakeGpu(clock)
    windowed = StepTimer(warmup_steps=2, marks=gpu, clock=clock)
    gpu_steps(windowed, clock, gpu, 22, batch=8, host_launch=0.001, device_work=0.004)
    s = windowed.summary()
    assert gpu.waits == 1 and gpu.syncs == 0  # one wait for the whole window
    assert s["timing_method"] == "fake_events"
    assert s["throughput_img_s"] == pytest.approx(8 / 0.004)
    assert s["step_ms_p50"] == pytest.approx(4.0)
    assert s["fwd_bwd_ms_p50"] == pytest.approx(3.2)  # device time, not launch time
    assert s["optim_ms_p50"] == pytest.approx(0.8)

    clock2 = FakeClock()
    gpu2 = FakeGpu(clock2)
    synced = StepTimer(warmup_steps=2, sync=gpu2.sync, clock=clock2)
    gpu_steps(synced, clock2, gpu2, 22, batch=8, host_launch=0.001, device_work=0.004)
    s2 = synced.summary()
    assert gpu2.syncs == 22 * 4 and s2["timing_method"] == "host_clock_synced"
    assert s2["throughput_img_s"] == pytest.approx(8 / 0.005)


def test_data_wait_is_host_time_blocked_on_the_batch():
    """The device idles while the host waits for data: each step takes wait + launch on
    the device's timeline, and the wait is the host's own time before data_ready."""
    clock = FakeClock()
    gpu = FakeGpu(clock)
    timer = StepTimer(warmup_steps=1, marks=gpu, clock=clock)
    gpu_steps(timer, clock, gpu, 11, batch=4, host_launch=0.001, device_work=0.0005,
              data_wait=0.003)
    s = timer.summary()
    assert s["throughput_img_s"] == pytest.approx(4 / 0.004)
    assert s["data_wait_pct"] == pytest.approx(75.0)


def test_events_agree_with_per_step_timing_when_nothing_runs_ahead():
    """Host-bound steps (device work shorter than launching it): nothing to run ahead,
    so the windowed and the synchronized timings must give the same numbers."""
    results = []
    for mode in ("events", "synced"):
        clock = FakeClock()
        gpu = FakeGpu(clock)
        timer = (StepTimer(warmup_steps=1, marks=gpu, clock=clock) if mode == "events"
                 else StepTimer(warmup_steps=1, sync=gpu.sync, clock=clock))
        gpu_steps(timer, clock, gpu, 9, batch=2, host_launch=0.010, device_work=0.0)
        results.append(timer.summary())
    for key in ("throughput_img_s", "wall_s", "step_ms_p50", "data_wait_pct"):
        assert results[0][key] == pytest.approx(results[1][key]), key


def test_pauses_are_measured_on_the_device_timeline():
    """Validation queued inside paused() is excluded; training work still running on the
    device when the pause starts is not."""
    clock = FakeClock()
    gpu = FakeGpu(clock)
    timer = StepTimer(warmup_steps=0, marks=gpu, clock=clock)
    gpu_steps(timer, clock, gpu, 3, batch=1, host_launch=0.001, device_work=0.010)
    with timer.paused():
        gpu.launch(0.5)  # validation: 0.5 s of device work
        clock.advance(0.002)
    gpu_steps(timer, clock, gpu, 3, batch=1, host_launch=0.001, device_work=0.010)
    s = timer.summary()
    # 6 steps of 10 ms back to back on the device, plus the 0.5 ms the idle device waited
    # for the first launch; the validation's 0.5 s is out, though the host entered the
    # pause while the device still had ~27 ms of training queued.
    assert s["wall_s"] == pytest.approx(0.0605)
    assert s["throughput_img_s"] == pytest.approx(6 / 0.0605)


def test_long_windows_read_finished_events_without_waiting(monkeypatch):
    monkeypatch.setattr(StepTimer, "RESOLVE_EVERY", 4)
    clock = FakeClock()
    gpu = FakeGpu(clock)
    timer = StepTimer(warmup_steps=0, marks=gpu, clock=clock)
    gpu_steps(timer, clock, gpu, 10, batch=1, host_launch=0.001, device_work=0.0005)
    assert gpu.waits == 0 and len(timer._unread) < 4  # read as the device finished them
    assert timer.measured_steps == 10
    # Host-bound: 1 ms a step, plus the last optimizer kernels (0.1 ms) after the host.
    assert timer.summary()["throughput_img_s"] == pytest.approx(10 / 0.0101)


class RecordedMarks:
    """CPU marks that behave like CUDA events: a token is an id, read only later."""

    kind = "recorded"

    def __init__(self) -> None:
        self.times: list[float] = []
        self.reads = 0

    def mark(self) -> int:
        import time

        self.times.append(time.perf_counter())
        return len(self.times) - 1

    def done(self, token: int) -> bool:
        return True

    def wait(self, token: int) -> None:
        pass

    def seconds(self, start: int, end: int) -> float:
        self.reads += 1
        return self.times[end] - self.times[start]


def test_window_and_per_step_timing_agree_on_a_real_cpu_loop(monkeypatch):
    """The same real training steps (the default model on CPU), timed at once by the
    per-step synchronized timer and by the windowed, deferred-read one: on a CPU nothing
    runs ahead, so the two throughputs may differ only by the microseconds between their
    marks."""
    from segcore.config import ModelConfig, TrainConfig
    from segcore.model import build_model
    from segcore.train.engines.base import Engine
    from segcore.train.losses import segmentation_loss

    monkeypatch.setattr(StepTimer, "RESOLVE_EVERY", 3)
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 6)
    engine = Engine(model, TrainConfig(lr=1e-3, schedule="none"), torch.device("cpu"), 100)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (2, 32, 32))
    syncs = []
    per_step = StepTimer(warmup_steps=1, sync=lambda: syncs.append(1))
    marks = RecordedMarks()
    windowed = StepTimer(warmup_steps=1, marks=marks)
    both = (per_step, windowed)
    for _ in range(7):
        for t in both:
            t.begin()
        xb, yb = x.clone(), y.clone()
        for t in both:
            t.data_ready()
        engine.backward(segmentation_loss(engine.forward(xb), yb, binary=False))
        for t in both:
            t.compute_done()
        engine.step()
        for t in reversed(both):
            t.end(2)
    a, b = per_step.summary(), windowed.summary()
    assert len(syncs) == 7 * 4 and marks.reads > 0
    assert a["measured_steps"] == b["measured_steps"] == 6
    assert b["throughput_img_s"] == pytest.approx(a["throughput_img_s"], rel=0.01)
    assert b["step_ms_p50"] == pytest.approx(a["step_ms_p50"], rel=0.02)


def test_step_timer_factory_and_misuse():
    cpu = telemetry.step_timer(2, "cpu")
    assert cpu.method == "host_clock" and cpu.warmup_steps == 2
    with pytest.raises(ValueError, match="not both"):
        StepTimer(0, sync=lambda: None, marks=telemetry.HostMarks())


# --------------------------------------------------------------------------- memory phases


def test_phase_peaks_keep_each_phase_apart(monkeypatch):
    """Fake allocator: a big validation peak must not show up as the training peak, nor
    the warm-up's autotuning workspace."""
    state = {"peak": 0.0, "now": 0.0}

    def alloc(_device):
        return state["peak"]

    def reset(_device):
        state["peak"] = state["now"]

    def use(mb):  # allocate to mb, then free back to the resident level
        state["peak"] = max(state["peak"], mb)

    from segcore.train import memory

    monkeypatch.setattr(memory, "allocator_peak_mb", alloc)
    monkeypatch.setattr(memory, "reset_allocator_peak", reset)
    phases = telemetry.PhasePeaks("cuda:0")
    state["now"] = 100.0  # weights + optimizer state
    phases.enter("warmup")
    use(900.0)  # cuDNN autotuning workspaces
    phases.enter("train")
    use(300.0)
    with phases.during("val"):
        use(2000.0)  # full-size validation images
    assert phases.phase == "train"
    use(320.0)
    r = phases.result()
    assert r == {"warmup_mb": 900.0, "train_mb": 320.0, "val_mb": 2000.0,
                 "overall_mb": 2000.0}
    assert phases.source == "allocator"
    with pytest.raises(ValueError, match="phase"):
        phases.enter("inference")


def test_phase_peaks_on_the_host_are_above_the_baseline():
    base = host_rss_mb()
    phases = telemetry.PhasePeaks("cpu", baseline_mb=base)
    phases.enter("train")
    # 40 MiB of fresh pages, touched: an anonymous mapping, so the allocator cannot hand
    # back pages an earlier test freed but the process still holds (no RSS growth then).
    import mmap

    block = mmap.mmap(-1, 40 * 2 ** 20)
    block.write(b"\x01" * len(block))
    block.close()
    r = phases.result()
    assert phases.source == "host_peak_rss"
    assert r["train_mb"] is not None and r["train_mb"] >= 30.0
    assert r["val_mb"] is None and r["overall_mb"] == r["train_mb"]


# --------------------------------------------------------------------------- CUDA math, GEMM


def test_cuda_math_reads_and_sets_the_new_tf32_api(monkeypatch):
    from types import SimpleNamespace

    matmul = SimpleNamespace(fp32_precision="none")
    conv = SimpleNamespace(fp32_precision="none")
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", SimpleNamespace(benchmark=False, conv=conv))
    monkeypatch.setattr(torch.backends, "fp32_precision", "none", raising=False)
    # "none" everywhere: the legacy defaults (matmul off, cuDNN convolutions on).
    assert telemetry.cuda_math() == {"cudnn_benchmark": False, "tf32_matmul": False,
                                     "tf32_conv": True, "tf32_api": "fp32_precision"}
    got = telemetry.set_cuda_math(tf32=True)
    assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    assert got["tf32_matmul"] and got["tf32_conv"] and got["cudnn_benchmark"]
    got = telemetry.set_cuda_math(tf32=False, cudnn_benchmark=False)
    assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    assert not (got["tf32_matmul"] or got["tf32_conv"] or got["cudnn_benchmark"])


def test_cuda_math_falls_back_to_the_legacy_flags(monkeypatch):
    from types import SimpleNamespace

    matmul = SimpleNamespace(allow_tf32=False)
    cudnn = SimpleNamespace(benchmark=False, allow_tf32=True)
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    assert telemetry.cuda_math()["tf32_api"] == "allow_tf32"
    got = telemetry.set_cuda_math(tf32=True)
    assert matmul.allow_tf32 and cudnn.allow_tf32 and cudnn.benchmark
    assert got == {"cudnn_benchmark": True, "tf32_matmul": True, "tf32_conv": True,
                   "tf32_api": "allow_tf32"}


def test_gemm_ceiling_is_labelled_and_equals_the_cpu_peak():
    gemm, source = telemetry.measured_gemm_tflops("cpu", "fp32")
    assert gemm > 0 and source.endswith(" fp32")
    assert source.startswith(("measured matmul ", "measured conv3x3 "))
    # On a CPU there is no datasheet: the "spec" peak is the same measurement.
    assert device_peak_tflops("cpu", "fp32") == (gemm, source)


def test_cpu_ceiling_is_the_faster_of_matmul_and_convolution(monkeypatch):
    """On a CPU matmul (MKL) and convolution (oneDNN) are different libraries: the ceiling
    an MFU divides by is the faster of the two, so a conv-bound U-Net step cannot read
    MFU > 1 merely because MKL's GEMM is the slower kernel (AMD EPYC: 187 vs 396 GFLOP/s)."""
    telemetry._measured_matmul_tflops.cache_clear()
    telemetry._measured_conv_tflops.cache_clear()
    monkeypatch.setattr(telemetry, "_measured_matmul_tflops", lambda *a: (0.1, 1024))
    monkeypatch.setattr(telemetry, "_measured_conv_tflops", lambda *a: (0.4, "8x64x64x64"))
    assert telemetry.measured_gemm_tflops("cpu", "fp32") == (
        0.4, "measured conv3x3 64ch channels-last 8x64x64x64 fp32")
    monkeypatch.setattr(telemetry, "_measured_conv_tflops", lambda *a: (0.05, "8x64x64x64"))
    assert telemetry.measured_gemm_tflops("cpu", "fp32") == (0.1, "measured matmul 1024x1024 fp32")


def test_conv_ceiling_is_a_real_measurement():
    tflops, shape = telemetry._measured_conv_tflops("cpu", "fp32", torch.get_num_threads())
    assert tflops > 0 and math.isfinite(tflops)
    b, c, h, w = map(int, shape.split("x"))
    assert (b, c) == (8, 64) and h == w and 16 <= h <= 256
