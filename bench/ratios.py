"""In-run ratios: two variants timed alternately in one process, reported as a ratio.

An absolute time depends on the machine and on what else runs on it; the ratio of two
variants timed moments apart on the same machine mostly does not (bf16 vs fp32 on one
CPU, a lookup table vs a Python loop). :class:`PairedReference` times a reference
callable right before each round of a benchmark (as pytest-benchmark's ``setup``, so it
is outside the benchmark's clock), and :func:`record_ratio` stores the median of the
per-round ratios ``benchmark / reference`` with a confidence interval in ``extra_info``
under ``ratio``. The session summary (``bench/conftest.py``) prints them, and the saved
JSON keeps them beside the absolute times.
"""

from __future__ import annotations

import time
from typing import Callable

from bench.compare import median, median_ci


class PairedReference:
    """Times ``reference()`` before every benchmark round.

    Pass :meth:`setup` as ``benchmark.pedantic(..., setup=ref.setup)``: pytest-benchmark
    calls it before each warm-up and each measured round and does not time it, so round
    i of the benchmark and reference call i run back to back.

    Args:
        reference: the denominator variant; called with no arguments. Its own device
            synchronisation must be inside it (as in the benchmarks' timed functions).
    """

    def __init__(self, reference: Callable[[], object]) -> None:
        self.reference = reference
        self.times: list[float] = []
        self.last = None

    def setup(self) -> None:
        t0 = time.perf_counter()
        self.last = self.reference()
        self.times.append(time.perf_counter() - t0)
        # None: pedantic keeps the target's own (empty) arguments

    def ratios(self, benchmark) -> list[float]:
        """Per-round ``benchmark time / reference time``; [] when not timed.

        The benchmark's measured rounds are the last ones; the reference calls made
        before the warm-up rounds are dropped with them.
        """
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        data = list(getattr(stats, "data", []) or [])
        if not data or len(self.times) < len(data):
            return []
        ref = self.times[-len(data):]
        return [a / b for a, b in zip(data, ref) if b > 0]


def record_ratio(benchmark, ref: PairedReference, name: str, numerator: str,
                 denominator: str) -> dict | None:
    """Store the ratio ``numerator / denominator`` time in ``benchmark.extra_info["ratio"]``.

    Returns:
        The stored entry (``median``, ``ci``, ``coverage``, ``pairs``, names), or None
        when the benchmark was not timed (``--benchmark-disable``).
    """
    rs = ref.ratios(benchmark)
    if not rs:
        return None
    low, high, cov = median_ci(rs)
    entry = {"name": name, "numerator": numerator, "denominator": denominator,
             "median": median(rs), "ci": [low, high], "coverage": cov, "pairs": len(rs),
             "reference_median_s": median(ref.times[-len(rs):])}
    benchmark.extra_info["ratio"] = entry
    return entry
