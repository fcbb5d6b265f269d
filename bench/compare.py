"""Same-machine, interleaved A/B comparison of the benchmark suite against a git revision.

    python bench/compare.py [--base REV] [--rounds N] [--threshold 0.10] [-k EXPR]
                            [--env VAR=VAL ...] [--json OUT] [PATH ...]

Why not ``--benchmark-compare``: a saved baseline is only comparable on the machine (and
in the machine state) it was recorded on. On a shared or different machine, background
load and clock changes move every timing by more than the regressions we look for. This
tool measures both sides now, on this machine, interleaved: round i runs the selected
benchmarks of the base revision and of the working tree back to back (the order
alternates between rounds), each in a fresh ``pytest --benchmark-only`` process. Drift
(a neighbour's job starting, thermal throttling) then hits both halves of a pair alike
and cancels in the per-pair ratio ``candidate / base``.

Per benchmark it reports the median of the per-pair ratios and a distribution-free
confidence interval for that median (binomial order statistics: no assumption about the
shape of the noise). A benchmark fails the comparison (exit status 1) only when it is
both practically slower (median ratio > 1 + threshold) and statistically slower (the
whole interval above 1), so noise alone does not fail it.

The base revision is checked out into a temporary ``git worktree`` (removed afterwards)
and its benchmarks run against its own ``segcore`` (``PYTHONPATH`` points at the
worktree, and a start-up check verifies it). ``--base WORKTREE`` runs the working tree
against itself: an A/A run that shows this machine's noise floor, or, with ``--env``
on the candidate side, a drill (``--env SEGBENCH_BENCH_SLEEP_MS=20`` must be caught).

Exit status: 0 no regression, 1 regression, 2 the comparison could not be made.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

WORKTREE = "WORKTREE"  # --base value: compare the working tree with itself (A/A)
MIN_ROUNDS = 3


class CompareError(RuntimeError):
    """The comparison cannot be made (not a git checkout, unknown revision, a side failed)."""


# --------------------------------------------------------------------------- statistics
# Pure functions: unit-tested in tests/test_bench_compare.py.


def pair_rounds(base: Sequence[Mapping[str, float]], cand: Sequence[Mapping[str, float]]
                ) -> dict[str, list[tuple[float, float]]]:
    """Pair the two sides' timings round by round.

    Args:
        base, cand: per round, ``{benchmark name: seconds}`` (the round's median time of
            each benchmark); index i of both lists is the same round.

    Returns:
        ``{name: [(base_s, cand_s), ...]}`` for every name timed on both sides, with one
        pair per round in which both sides have it (a round never pairs with another).
    """
    if len(base) != len(cand):
        raise ValueError(f"{len(base)} base rounds but {len(cand)} candidate rounds")
    pairs: dict[str, list[tuple[float, float]]] = {}
    for b, c in zip(base, cand):
        for name in b.keys() & c.keys():
            pairs.setdefault(name, []).append((float(b[name]), float(c[name])))
    return dict(sorted(pairs.items()))


def pair_ratios(pairs: Sequence[tuple[float, float]]) -> list[float]:
    """``candidate / base`` for each pair (> 1: the candidate is slower)."""
    out = []
    for b, c in pairs:
        if not (b > 0 and c > 0 and math.isfinite(b) and math.isfinite(c)):
            raise ValueError(f"timings must be positive and finite, got base={b} cand={c}")
        out.append(c / b)
    return out


def median(xs: Sequence[float]) -> float:
    """Median (the mean of the two middle values for an even count)."""
    if not xs:
        raise ValueError("median of an empty sequence")
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _binom_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def median_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free confidence interval for the median.

    The interval between the k-th smallest and the k-th largest value covers the true
    median with probability ``1 - 2 P(Binomial(n, 1/2) <= k - 1)``, whatever the noise
    distribution. The narrowest such interval with at least ``level`` coverage is
    returned; with fewer than 6 values none reaches 95 %, and the widest interval
    (min, max) is returned with its actual, lower coverage.

    Returns:
        ``(low, high, coverage)``.
    """
    if not xs:
        raise ValueError("confidence interval of an empty sequence")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s = sorted(xs)
    n = len(s)
    k = 1
    while k + 1 <= (n + 1) // 2 and 1 - 2 * _binom_cdf_half(k, n) >= level:
        k += 1
    coverage = max(0.0, 1 - 2 * _binom_cdf_half(k - 1, n))
    return s[k - 1], s[n - k], coverage


REGRESSION, FASTER, SLOWER_NOISE, OK, TOO_FEW = (
    "REGRESSION", "faster", "slower?", "ok", "too few pairs")


def verdict(med: float, low: float, high: float, threshold: float, n: int) -> str:
    """Classify one benchmark's ratio.

    ``REGRESSION`` (fails the run) needs both a median ratio above ``1 + threshold`` and a
    confidence interval wholly above 1. ``slower?``: the median is past the threshold but
    the interval includes 1 (noise cannot be ruled out: rerun with more rounds).
    ``faster``: the mirror image of a regression, reported, never failing.
    """
    if n < MIN_ROUNDS:
        return TOO_FEW
    if med > 1 + threshold:
        return REGRESSION if low > 1 else SLOWER_NOISE
    if med < 1 - threshold and high < 1:
        return FASTER
    return OK


@dataclass
class Result:
    """The comparison of one benchmark."""

    name: str
    base_s: float  # median over rounds of the base side's round medians
    cand_s: float
    ratio: float  # median of the per-pair ratios candidate / base
    low: float
    high: float
    coverage: float
    pairs: int
    verdict: str
    ratios: list[float] = field(default_factory=list)


def summarize(name: str, pairs: Sequence[tuple[float, float]], threshold: float,
              level: float = 0.95) -> Result:
    """Median ratio, its confidence interval and the verdict for one benchmark."""
    rs = pair_ratios(pairs)
    med = median(rs)
    low, high, cov = median_ci(rs, level)
    return Result(name=name, base_s=median([b for b, _ in pairs]),
                  cand_s=median([c for _, c in pairs]), ratio=med, low=low, high=high,
                  coverage=cov, pairs=len(rs), verdict=verdict(med, low, high, threshold,
                                                               len(rs)),
                  ratios=rs)


def exit_status(results: Sequence[Result]) -> int:
    """1 if any benchmark regressed, else 0."""
    return 1 if any(r.verdict == REGRESSION for r in results) else 0


def format_table(results: Sequence[Result], threshold: float) -> str:
    """A fixed-width table: one row per benchmark, ratio = candidate / base."""
    head = ("benchmark", "base", "candidate", "ratio", "CI", "pairs", "verdict")
    rows = [head]
    for r in results:
        rows.append((r.name, _ms(r.base_s), _ms(r.cand_s), f"{r.ratio:.3f}",
                     f"[{r.low:.3f}, {r.high:.3f}] {r.coverage:.0%}", str(r.pairs),
                     r.verdict))
    w = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) if i in (0, 6) else c.rjust(w[i])
                       for i, c in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"ratio = candidate / base time (median of per-round pairs); "
                 f"REGRESSION = ratio > {1 + threshold:.2f} and CI above 1")
    return "\n".join(lines)


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 0.01 else f"{s * 1e3:.1f} ms"


def round_medians(report: Mapping) -> dict[str, float]:
    """``{fullname: median seconds}`` from a pytest-benchmark JSON report."""
    return {b["fullname"]: float(b["stats"]["median"]) for b in report.get("benchmarks", [])
            if b.get("stats")}


# --------------------------------------------------------------------------- running


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=check)


def repo_root(start: Path) -> Path:
    """The git work tree containing ``start``; CompareError outside one."""
    if shutil.which("git") is None:
        raise CompareError("git is not installed; compare.py checks the base revision out "
                           "with 'git worktree' (or use --base WORKTREE for an A/A run)")
    p = _git(start, "rev-parse", "--show-toplevel", check=False)
    if p.returncode:
        raise CompareError(f"{start} is not inside a git work tree: compare.py checks the "
                           "base revision out with 'git worktree'. Run it from a git "
                           "checkout of segbench, or use --base WORKTREE for an A/A run.")
    return Path(p.stdout.strip())


def resolve_rev(repo: Path, rev: str) -> str:
    """Full commit id of ``rev``; CompareError naming the revision if git does not know it."""
    p = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if p.returncode or not p.stdout.strip():
        raise CompareError(f"unknown base revision {rev!r} in {repo} (try HEAD, HEAD~1, a "
                           "branch, a tag or a commit id; 'git log --oneline' lists them)")
    return p.stdout.strip()


@dataclass
class Side:
    """One side of the comparison: a source tree and the environment its pytest runs in."""

    label: str
    root: Path
    env: dict[str, str]


def side_env(root: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of one side: this one, with ``root`` first on ``PYTHONPATH``.

    An editable install of segbench would otherwise import the *working tree's*
    ``segcore`` on the base side too (the check in :func:`check_imports` proves it does
    not).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "")
                                                       .split(os.pathsep) if p])
    env.update(extra or {})
    return env


def check_imports(side: Side) -> None:
    """Fail early if a side would import segcore from somewhere other than its own tree."""
    p = subprocess.run([sys.executable, "-c", "import segcore; print(segcore.__file__)"],
                       cwd=side.root, env=side.env, capture_output=True, text=True)
    if p.returncode:
        raise CompareError(f"{side.label}: 'import segcore' fails in {side.root}:\n"
                           f"{p.stderr[-2000:]}")
    where = Path(p.stdout.strip()).resolve()
    if side.root.resolve() not in where.parents:
        raise CompareError(f"{side.label}: imports segcore from {where}, not from its own "
                           f"tree {side.root}; clear PYTHONPATH / the editable install path")


def run_round(side: Side, paths: Sequence[str], keyword: str | None, out: Path,
              timeout_s: float) -> dict[str, float]:
    """One fresh ``pytest --benchmark-only`` process on one side; its round medians."""
    cmd = [sys.executable, "-m", "pytest", *paths, "--benchmark-only",
           f"--benchmark-json={out}", "-q", "-p", "no:cacheprovider",
           "--benchmark-quiet"]
    if keyword:
        cmd += ["-k", keyword]
    try:
        p = subprocess.run(cmd, cwd=side.root, env=side.env, capture_output=True, text=True,
                           timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise CompareError(f"{side.label}: pytest ran past {timeout_s:.0f} s "
                           f"({' '.join(cmd[2:])})") from None
    if p.returncode == 5:
        return {}  # nothing selected on this side: reported as "only on one side"
    if p.returncode:
        tail = (p.stdout + p.stderr)[-3000:]
        raise CompareError(f"{side.label}: pytest failed (exit {p.returncode}) in "
                           f"{side.root}:\n{tail}")
    return round_medians(json.loads(out.read_text()))


def interleave(sides: tuple[Side, Side], rounds: int, paths: Sequence[str],
               keyword: str | None, workdir: Path, timeout_s: float,
               log=print) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Run base and candidate alternately, ``rounds`` times each.

    The order flips every round (AB, BA, AB, ...) so a systematic first-or-second effect
    (a cache warmed by the previous process, a frequency ramp) does not favour one side.
    """
    got: tuple[list, list] = ([], [])
    for i in range(rounds):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        took = {}
        for s in order:
            t0 = time.perf_counter()
            got[s].append(run_round(sides[s], paths, keyword,
                                    workdir / f"{sides[s].label}-{i}.json", timeout_s))
            took[s] = time.perf_counter() - t0
        if i == 0 and not (got[0][0] or got[1][0]):
            raise CompareError(f"no benchmark selected on either side by {list(paths)}"
                               + (f" -k {keyword!r}" if keyword else ""))
        log(f"round {i + 1}/{rounds}: {sides[0].label} {took[0]:.1f} s, "
            f"{sides[1].label} {took[1]:.1f} s, {len(got[1][-1])} benchmarks")
    return got


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``["VAR=VAL", ...]`` -> dict; ValueError names a malformed item."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--env {item!r}: expected VAR=VALUE")
        env[name] = value
    return env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/compare.py",
        description="Interleaved same-machine comparison of the benchmark suite: the base "
                    "revision (a temporary git worktree) vs the working tree.",
        epilog="Exit status: 0 no regression, 1 regression, 2 could not compare.")
    p.add_argument("paths", nargs="*", default=["bench"],
                   help="benchmark files or folders, relative to the repository root "
                        "(default: bench). Fewer files = faster start-up per round.")
    p.add_argument("--base", default="HEAD",
                   help="git revision to compare against (default HEAD); WORKTREE = the "
                        "working tree itself (A/A run)")
    p.add_argument("--rounds", type=int, default=9,
                   help="interleaved rounds, each one pytest process per side (default 9: "
                        "the smallest count whose 95%% interval drops the extreme pair)")
    p.add_argument("--threshold", type=float, default=0.10,
                   help="relative slowdown that counts as a regression (default 0.10)")
    p.add_argument("-k", dest="keyword", default=None,
                   help="pytest -k expression selecting benchmarks")
    p.add_argument("--env", action="append", default=[], metavar="VAR=VAL",
                   help="environment variable for the candidate side only (repeatable)")
    p.add_argument("--level", type=float, default=0.95,
                   help="confidence level of the interval (default 0.95)")
    p.add_argument("--json", type=Path, default=None,
                   help="write the per-round timings and the results here")
    p.add_argument("--timeout", type=float, default=900,
                   help="seconds one pytest process may run (default 900)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.rounds < MIN_ROUNDS:
            raise CompareError(f"--rounds {args.rounds}: need at least {MIN_ROUNDS} rounds")
        if not 0 < args.threshold < 1:
            raise CompareError(f"--threshold {args.threshold}: give a fraction in (0, 1)")
        cand_env = parse_env(args.env)
        return _compare(args, cand_env)
    except (CompareError, ValueError) as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2


def _compare(args, cand_env: dict[str, str]) -> int:
    repo = repo_root(Path(__file__).resolve().parent) if args.base != WORKTREE else \
        Path(__file__).resolve().parents[1]
    workdir = Path(tempfile.mkdtemp(prefix="segbench-compare-"))
    worktree = None
    try:
        if args.base == WORKTREE:
            base_root, base_desc = repo, "working tree (A/A)"
        else:
            sha = resolve_rev(repo, args.base)
            worktree = workdir / "base"
            p = _git(repo, "worktree", "add", "--detach", str(worktree), sha, check=False)
            if p.returncode:
                worktree = None
                raise CompareError(f"git worktree add failed: {p.stderr.strip()}")
            base_root, base_desc = worktree, f"{args.base} ({sha[:10]})"
        for path in args.paths:
            for root, label in ((base_root, "base"), (repo, "candidate")):
                if not (root / path).exists():
                    raise CompareError(f"{path} does not exist on the {label} side "
                                       f"({base_desc if label == 'base' else 'working tree'})"
                                       "; pass paths that exist on both sides")
        sides = (Side("base", base_root, side_env(base_root)),
                 Side("candidate", repo, side_env(repo, cand_env)))
        for s in sides:
            check_imports(s)
        env_s = " ".join(f"{k}={v}" for k, v in cand_env.items()) or "-"
        print(f"base: {base_desc}; candidate: working tree {repo} (env: {env_s})")
        print(f"{args.rounds} interleaved rounds of pytest {' '.join(args.paths)}"
              + (f" -k {args.keyword!r}" if args.keyword else ""), flush=True)
        base_rounds, cand_rounds = interleave(
            sides, args.rounds, args.paths, args.keyword, workdir, args.timeout,
            log=lambda m: print(m, flush=True))
    finally:
        if worktree is not None:
            _git(repo, "worktree", "remove", "--force", str(worktree), check=False)
        shutil.rmtree(workdir, ignore_errors=True)
        if worktree is not None:
            _git(repo, "worktree", "prune", check=False)

    pairs = pair_rounds(base_rounds, cand_rounds)
    results = [summarize(n, ps, args.threshold, args.level) for n, ps in pairs.items()]
    only_base = sorted({n for r in base_rounds for n in r} - pairs.keys())
    only_cand = sorted({n for r in cand_rounds for n in r} - pairs.keys())
    print()
    if results:
        print(format_table(results, args.threshold))
    for label, names in (("only in base (removed?)", only_base),
                         ("only in candidate (new)", only_cand)):
        for n in names:
            print(f"{label}: {n}")
    if args.json:
        args.json.write_text(json.dumps({
            "base": base_desc, "candidate_env": cand_env, "rounds": args.rounds,
            "threshold": args.threshold, "level": args.level,
            "base_rounds": base_rounds, "candidate_rounds": cand_rounds,
            "results": [asdict(r) for r in results]}, indent=2) + "\n")
    if not results:
        print("compare.py: error: no benchmark ran on both sides", file=sys.stderr)
        return 2
    status = exit_status(results)
    print("FAIL: regression" if status else "PASS: no regression")
    return status


if __name__ == "__main__":
    sys.exit(main())
