"""bench/compare.py's statistics and decision, and bench/ratios.py's pairing.

The pure functions run in microseconds; one end-to-end smoke test (a throwaway git
repository with a one-line benchmark, compared against itself and against a slowed
copy) is marked ``slow``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) omits the cwd
    sys.path.insert(0, str(ROOT))

from bench import compare as C  # noqa: E402
from bench.ratios import PairedReference, record_ratio  # noqa: E402


# --------------------------------------------------------------------------- pairing


def test_pair_rounds_pairs_within_a_round_only():
    base = [{"a": 1.0, "b": 2.0}, {"a": 3.0}, {"a": 5.0, "b": 6.0}]
    cand = [{"a": 1.1, "b": 2.2}, {"a": 3.3, "b": 9.9}, {"a": 5.5}]
    pairs = C.pair_rounds(base, cand)
    assert pairs == {"a": [(1.0, 1.1), (3.0, 3.3), (5.0, 5.5)], "b": [(2.0, 2.2)]}


def test_pair_rounds_leaves_out_one_sided_benchmarks():
    pairs = C.pair_rounds([{"old": 1.0, "x": 1.0}], [{"new": 1.0, "x": 2.0}])
    assert list(pairs) == ["x"]


def test_pair_rounds_rejects_unequal_round_counts():
    with pytest.raises(ValueError, match="2 base rounds but 1 candidate"):
        C.pair_rounds([{}, {}], [{}])


def test_pair_ratios_is_candidate_over_base():
    assert C.pair_ratios([(2.0, 3.0), (4.0, 2.0)]) == [1.5, 0.5]


@pytest.mark.parametrize("bad", [(0.0, 1.0), (1.0, -1.0), (math.nan, 1.0), (1.0, math.inf)])
def test_pair_ratios_rejects_non_positive_or_non_finite(bad):
    with pytest.raises(ValueError, match="positive and finite"):
        C.pair_ratios([bad])


def test_round_medians_reads_pytest_benchmark_json():
    report = {"benchmarks": [
        {"fullname": "bench/t.py::test_a", "stats": {"median": 0.5, "mean": 9.0}},
        {"fullname": "bench/t.py::test_b[x]", "stats": {"median": 0.25}}]}
    assert C.round_medians(report) == {"bench/t.py::test_a": 0.5, "bench/t.py::test_b[x]": 0.25}
    assert C.round_medians({}) == {}


# --------------------------------------------------------------------------- median and CI


def test_median():
    assert C.median([3.0, 1.0, 2.0]) == 2.0
    assert C.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        C.median([])


def _exact_coverage(n: int, k: int) -> float:
    """P(x_(k) <= true median <= x_(n-k+1)): k..n-k of n draws fall below the median."""
    return sum(math.comb(n, i) for i in range(k, n - k + 1)) / 2 ** n


@pytest.mark.parametrize("n,k", [(3, 1), (5, 1), (6, 1), (8, 1), (9, 2), (10, 2), (20, 6),
                                 (40, 14)])
def test_median_ci_picks_the_narrowest_interval_with_95_percent(n, k):
    xs = [float(i) for i in range(n, 0, -1)]  # unsorted on purpose
    low, high, cov = C.median_ci(xs, 0.95)
    assert (low, high) == (float(k), float(n - k + 1))
    assert cov == pytest.approx(_exact_coverage(n, k))
    # 95 % reached whenever it can be; one step narrower would fall short of it
    assert cov >= 0.95 or k == 1
    if k + 1 <= (n + 1) // 2:
        assert _exact_coverage(n, k + 1) < 0.95


def test_median_ci_reports_low_coverage_for_few_values():
    low, high, cov = C.median_ci([1.2, 1.0, 1.1, 1.3, 0.9])
    assert (low, high) == (0.9, 1.3)
    assert cov == pytest.approx(1 - 2 / 32)  # 93.75 %: five pairs cannot give 95 %


def test_median_ci_single_value_and_bad_level():
    assert C.median_ci([2.0]) == (2.0, 2.0, 0.0)
    with pytest.raises(ValueError):
        C.median_ci([], 0.95)
    with pytest.raises(ValueError, match="level"):
        C.median_ci([1.0, 2.0], 1.5)


# --------------------------------------------------------------------------- verdict


@pytest.mark.parametrize("med,low,high,expect", [
    (1.25, 1.05, 1.40, C.REGRESSION),    # slower, and the interval excludes 1
    (1.25, 0.95, 1.60, C.SLOWER_NOISE),  # past the threshold but noise can explain it
    (1.08, 1.05, 1.10, C.OK),            # significant but below the 10 % threshold
    (1.10, 1.05, 1.20, C.OK),            # exactly at the threshold does not fail
    (0.80, 0.70, 0.85, C.FASTER),
    (0.80, 0.70, 1.05, C.OK),            # maybe faster: not claimed
    (1.00, 0.97, 1.03, C.OK),
])
def test_verdict(med, low, high, expect):
    assert C.verdict(med, low, high, 0.10, n=9) == expect


def test_verdict_needs_three_pairs():
    assert C.verdict(2.0, 1.9, 2.1, 0.10, n=2) == C.TOO_FEW


def test_exit_status_fails_only_on_a_regression():
    r = lambda v: SimpleNamespace(verdict=v)  # noqa: E731
    assert C.exit_status([r(C.OK), r(C.SLOWER_NOISE), r(C.FASTER), r(C.TOO_FEW)]) == 0
    assert C.exit_status([r(C.OK), r(C.REGRESSION)]) == 1
    assert C.exit_status([]) == 0


# --------------------------------------------------------------------------- end to end (pure)


def _drifting(n: int, factor: float, jitter: float):
    """A machine whose speed wanders 3x across rounds; within a round both sides see the
    same speed up to ``jitter``; the candidate is ``factor`` times the base."""
    speed = [1.0 + 2.0 * abs(math.sin(1.7 * i)) for i in range(n)]
    base = [{"b": 0.1 * s * (1 + jitter * math.sin(5.1 * i))} for i, s in enumerate(speed)]
    cand = [{"b": 0.1 * s * factor * (1 + jitter * math.cos(3.3 * i))}
            for i, s in enumerate(speed)]
    return base, cand


def test_summarize_cancels_drift_for_an_unchanged_tree():
    base, cand = _drifting(9, 1.0, 0.03)
    (name, pairs), = C.pair_rounds(base, cand).items()
    r = C.summarize(name, pairs, threshold=0.10)
    # the unpaired times vary 3x, yet the paired ratio stays near 1
    assert max(b for b, _ in pairs) / min(b for b, _ in pairs) > 2.5
    assert 0.95 < r.ratio < 1.05 and r.verdict == C.OK and r.pairs == 9


def test_summarize_catches_a_20_percent_slowdown_under_drift():
    base, cand = _drifting(9, 1.2, 0.03)
    (name, pairs), = C.pair_rounds(base, cand).items()
    r = C.summarize(name, pairs, threshold=0.10)
    assert r.ratio == pytest.approx(1.2, rel=0.05)
    assert r.low > 1 and r.verdict == C.REGRESSION
    assert C.exit_status([r]) == 1


def test_summarize_one_wild_pair_does_not_decide():
    # 8 clean pairs at +15 % and one pair hit by a neighbour's job on the base side
    pairs = [(1.0, 1.15)] * 8 + [(3.0, 1.15)]
    r = C.summarize("x", pairs, threshold=0.10)
    assert r.ratio == pytest.approx(1.15) and r.verdict == C.REGRESSION


def test_format_table_names_every_benchmark_and_verdict():
    rs = [C.summarize("bench/a.py::test_fast", [(1e-3, 1e-3)] * 5, 0.1),
          C.summarize("bench/a.py::test_slow", [(0.2, 0.3)] * 5, 0.1)]
    text = C.format_table(rs, 0.1)
    assert "test_fast" in text and "test_slow" in text
    assert C.REGRESSION in text and "1.500" in text and "1.000 ms" in text


def test_parse_env():
    assert C.parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(ValueError, match="VAR=VALUE"):
        C.parse_env(["NOEQUALS"])


def test_main_rejects_too_few_rounds_and_bad_threshold(capsys):
    assert C.main(["--base", C.WORKTREE, "--rounds", "2"]) == 2
    assert "at least 3 rounds" in capsys.readouterr().err
    assert C.main(["--base", C.WORKTREE, "--threshold", "10"]) == 2
    assert C.main(["--base", C.WORKTREE, "--env", "oops"]) == 2


# --------------------------------------------------------------------------- bench/ratios.py


def _timed(data):
    return SimpleNamespace(stats=SimpleNamespace(stats=SimpleNamespace(data=data)),
                           extra_info={})


def test_paired_reference_drops_warmup_calls_and_pairs_in_order():
    calls = []
    ref = PairedReference(lambda: calls.append(1) or len(calls))
    for _ in range(5):  # 2 warm-up rounds + 3 measured ones
        ref.setup()
    assert ref.last == 5 and len(ref.times) == 5
    ref.times = [9.0, 9.0, 1.0, 2.0, 4.0]  # the warm-up calls were slow
    bench = _timed([0.5, 1.0, 1.0])
    assert ref.ratios(bench) == [0.5, 0.5, 0.25]
    entry = record_ratio(bench, ref, "x", "fast", "slow")
    assert bench.extra_info["ratio"] is entry
    assert entry["median"] == 0.5 and entry["pairs"] == 3 and entry["ci"] == [0.25, 0.5]


def test_record_ratio_without_timing_records_nothing():
    bench = SimpleNamespace(stats=None, extra_info={})  # --benchmark-disable
    ref = PairedReference(lambda: None)
    ref.setup()
    assert record_ratio(bench, ref, "x", "a", "b") is None and bench.extra_info == {}


def test_session_summary_lines():
    from bench.conftest import ratio_lines, throughput_lines  # imports torch: kept local

    def fake(name, group, median, **info):
        return SimpleNamespace(name=name, group=group, extra_info=info,
                               stats=SimpleNamespace(median=median))

    ratio = {"name": "step: bf16 / fp32", "numerator": "bf16 step", "denominator": "fp32",
             "median": 0.5, "ci": [0.4, 0.6], "coverage": 0.97, "pairs": 6}
    benches = [fake("test_b", "g1", 0.2, img_per_s=20.0, device="cpu", threads=2, batch=4),
               fake("test_a", "g1", 0.1, px_per_s=2.5e6, device="cpu", threads=2,
                    err=0.0123456),
               fake("test_r", "g2", 0.3, ratio=ratio)]
    lines = throughput_lines(benches)
    assert lines[0] == "g1" and "test_a" in lines[1] and "test_b" in lines[2]  # by median
    assert "2.5 Mpx/s" in lines[1] and "err=0.01235" in lines[1] and "cpu/2t" in lines[1]
    assert "20 img/s" in lines[2] and "batch=4" in lines[2]
    assert lines[3] == "g2" and "ratio" not in lines[4]
    (line,) = ratio_lines(benches)
    assert "0.5" in line and "[0.4, 0.6]" in line and "bf16 step 2x faster" in line


# --------------------------------------------------------------------------- smoke (slow)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.mark.slow
def test_compare_end_to_end_in_a_throwaway_repo(tmp_path):
    """A real git worktree, real pytest-benchmark rounds: an unchanged tree passes, a
    slowed candidate fails, and the error paths say what is wrong."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "segcore").mkdir()
    (repo / "segcore" / "__init__.py").write_text("")
    (repo / "pytest.ini").write_text("[pytest]\n")  # rootdir: node ids start with bench/
    (repo / "bench" / "__init__.py").write_text("")
    (repo / "bench" / "compare.py").write_text((ROOT / "bench" / "compare.py").read_text())
    (repo / "bench" / "test_tiny.py").write_text(textwrap.dedent("""
        import os, time

        def test_sleep(benchmark):
            ms = 2 + float(os.environ.get("EXTRA_MS", "0"))
            benchmark.pedantic(time.sleep, args=(ms / 1000,), rounds=5, iterations=1)
    """))
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    script = [sys.executable, str(repo / "bench" / "compare.py"), "--rounds", "3"]

    out = tmp_path / "same.json"
    p = subprocess.run(script + ["--json", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())["results"]
    assert [r["name"] for r in res] == ["bench/test_tiny.py::test_sleep"]
    assert not list((repo / ".git" / "worktrees").glob("*"))  # worktree cleaned up

    p = subprocess.run(script + ["--env", "EXTRA_MS=8"], capture_output=True, text=True)
    assert p.returncode == 1 and C.REGRESSION in p.stdout, p.stdout + p.stderr

    p = subprocess.run(script + ["--base", "no-such-rev"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown base revision 'no-such-rev'" in p.stderr

    with pytest.raises(C.CompareError, match="not inside a git work tree"):
        C.repo_root(tmp_path)
