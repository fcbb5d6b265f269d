"""Shared helpers for the benchmark suite (pytest-benchmark).

Every benchmark records, in ``extra_info``, its throughput (images or pixels per second,
computed from the median round), the shapes, the device and the thread count, so the
saved JSON is self-describing. CUDA timings synchronize inside the timed function.
"""

from __future__ import annotations

import os

import pytest
import torch

BENCH_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if BENCH_DEVICE.type == "cuda":
        torch.cuda.synchronize()


def slowdown() -> None:
    """Deliberate slowdown for checking the comparison tooling: SEGBENCH_BENCH_SLEEP_MS."""
    ms = float(os.environ.get("SEGBENCH_BENCH_SLEEP_MS", "0") or 0)
    if ms > 0:
        import time
        time.sleep(ms / 1000)


def record(benchmark, items: int, unit: str = "img", **info) -> None:
    """Throughput from the median round, plus context, into ``extra_info``."""
    info.update(device=str(BENCH_DEVICE), threads=torch.get_num_threads(),
                torch=torch.__version__)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median:
        info[f"{unit}_per_s"] = items / stats.stats.median
    benchmark.extra_info.update(info)


@pytest.fixture
def bench_device() -> torch.device:
    return BENCH_DEVICE
