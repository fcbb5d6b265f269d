"""Shared helpers for the benchmark suite (pytest-benchmark).

Every benchmark records, in ``extra_info``, its throughput (images or pixels per second,
computed from the median round), the shapes, the device and the thread count, so the
saved JSON is self-describing. CUDA timings synchronize inside the timed function.
"""

from __future__ import annotations

import os

import pytest
import torch

from segcore.host import cpu_model
from segcore.train.telemetry import set_cuda_math

BENCH_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The training's CUDA math (cuDNN autotuning, TF32), so a benchmark times what a run
# runs; recorded in every benchmark's extra_info and the saved machine_info.
CUDA_MATH = set_cuda_math(tf32=True, cudnn_benchmark=True) \
    if BENCH_DEVICE.type == "cuda" else None


def skip_if_emulated(precision: str) -> None:
    """Leave out a precision this host only emulates (bf16 on an AVX2-only CPU ran a train
    step 13-33x slower than fp32): it would time the emulation, and take minutes.
    ``SEGBENCH_BENCH_EMULATED=1`` runs it anyway."""
    from segcore.precision import native_precision

    native, why = native_precision(precision, BENCH_DEVICE)
    if not native and os.environ.get("SEGBENCH_BENCH_EMULATED") != "1":
        pytest.skip(f"{precision} is emulated here ({why}); SEGBENCH_BENCH_EMULATED=1 "
                    "times it anyway")


def sync() -> None:
    if BENCH_DEVICE.type == "cuda":
        torch.cuda.synchronize()


def slowdown() -> None:
    """Deliberate slowdown for checking the comparison tooling: SEGBENCH_BENCH_SLEEP_MS
    sleeps, SEGBENCH_BENCH_SPIN_MS busy-waits.

    The busy-wait is the better model of a real regression on a loaded machine: it holds
    the CPU like extra computation would, whereas a process that slept is favoured by the
    scheduler when it wakes, so under contention the next round's compute can run faster
    and partly hide the sleep.
    """
    import time
    ms = float(os.environ.get("SEGBENCH_BENCH_SLEEP_MS", "0") or 0)
    if ms > 0:
        time.sleep(ms / 1000)
    spin = float(os.environ.get("SEGBENCH_BENCH_SPIN_MS", "0") or 0)
    if spin > 0:
        end = time.perf_counter() + spin / 1000
        while time.perf_counter() < end:
            pass


def record(benchmark, items: int, unit: str = "img", **info) -> None:
    """Throughput from the median round, plus context, into ``extra_info``.

    ``items`` per round become ``<unit>_per_s`` (e.g. ``img_per_s``, ``px_per_s``). A
    caller may pass ``device=...`` itself: host-side kernels (numpy) say ``cpu`` even on
    a CUDA machine.
    """
    for key, value in (("device", str(BENCH_DEVICE)), ("threads", torch.get_num_threads()),
                       ("torch", torch.__version__), ("cuda_math", CUDA_MATH)):
        info.setdefault(key, value)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median:
        info[f"{unit}_per_s"] = items / stats.stats.median
    benchmark.extra_info.update(info)


@pytest.fixture
def bench_device() -> torch.device:
    return BENCH_DEVICE


# --------------------------------------------------------------------------- reporting
# pytest-benchmark's own tables show times only (``--benchmark-columns`` cannot show
# extra_info), so a compact throughput table per group, and the in-run ratios, follow
# them at the end of the session.


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the CPU and the thread count in saved results (py-cpuinfo may be missing)."""
    machine_info["segbench"] = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                                "torch_threads": torch.get_num_threads(),
                                "bench_device": str(BENCH_DEVICE),
                                "cuda_device": torch.cuda.get_device_name(0)
                                if BENCH_DEVICE.type == "cuda" else None,
                                "cuda_math": CUDA_MATH}


def _si(value: float) -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g} "


def throughput_lines(benchmarks) -> list[str]:
    """One line per benchmark (grouped): median round, throughput, shapes.

    Args:
        benchmarks: objects with ``group``, ``name``, ``extra_info`` and ``stats.median``
            (pytest-benchmark's per-test metadata).
    """
    lines: list[str] = []
    by_group: dict[str, list] = {}
    for b in benchmarks:
        by_group.setdefault(b.group or "(no group)", []).append(b)
    skip = {"device", "threads", "torch", "ratio", "cuda_math"}
    for group in sorted(by_group):
        lines.append(f"{group}")
        rows = []
        for b in sorted(by_group[group], key=lambda b: b.stats.median):
            info = b.extra_info or {}
            rate = next(((k[: -len("_per_s")], v) for k, v in info.items()
                         if k.endswith("_per_s") and isinstance(v, (int, float))), None)
            rate_s = f"{_si(rate[1])}{rate[0]}/s" if rate else "-"
            ctx = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in info.items()
                           if k not in skip and not k.endswith("_per_s"))
            rows.append((b.name, f"{b.stats.median * 1e3:.2f} ms", rate_s,
                         f"{info.get('device', '?')}/{info.get('threads', '?')}t", ctx))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                          for i, (c, w) in enumerate(zip(r[:4], widths)))
                         + "  " + r[4])
    return lines


def ratio_lines(benchmarks) -> list[str]:
    """The in-run ratios recorded by :func:`bench.ratios.record_ratio`, one per line."""
    lines = []
    for b in benchmarks:
        r = (b.extra_info or {}).get("ratio")
        if not r:
            continue
        lo, hi = r["ci"]
        faster = f"{1 / r['median']:.3g}x faster" if r["median"] < 1 else \
            f"{r['median']:.3g}x slower"
        lines.append(f"  {r['name']:<40} {r['median']:8.4g}  [{lo:.4g}, {hi:.4g}] "
                     f"({r['coverage']:.0%} CI, {r['pairs']} pairs)  "
                     f"{r['numerator']} {faster}")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)  # pytest-benchmark's state
    done = [b for b in getattr(session, "benchmarks", []) or []
            if getattr(b, "stats", None) is not None and b.stats.rounds]
    if not done:
        return  # --benchmark-disable, or nothing ran
    tr = terminalreporter
    tr.section(f"segbench throughput (median round; {cpu_model()}, "
               f"{torch.get_num_threads()} threads)", sep="-")
    for line in throughput_lines(done):
        tr.write_line(line)
    ratios = ratio_lines(done)
    if ratios:
        tr.section("segbench in-run ratios (median of interleaved pairs; < 1: numerator faster)",
                   sep="-")
        for line in ratios:
            tr.write_line(line)
