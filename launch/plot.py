"""Redraw the figures and report of a results folder, or compare several folders.

    python launch/plot.py results/1xH100-80GB-20250101-120000
    python launch/plot.py results/a100-sweep results/h100-sweep --out compare/

One folder: re-analyses runs.jsonl (speedup, confidence flags, best configurations:
segcore/results/analysis.py) and rewrites <folder>/plots/*.png and <folder>/report.md
(runs.jsonl and runs.csv are only read). Several folders: writes the comparison
figures (one colour per folder) and compare.md into --out (default ./compare). Either
way it prints one summary line per folder (runs ok, low-confidence runs by flag, the
highest throughput we can stand behind). Folders recorded on different or unidentified
hardware are compared only with --mixed-hardware. Exit status: 0 done, 2 bad arguments (a
missing folder, no runs.jsonl, mixed hardware without --mixed-hardware).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", metavar="RESULTS_DIR",
                   help="results folder(s) holding runs.jsonl")
    p.add_argument("--out", help="one folder: write plots/ and report.md here instead of "
                                 "into it; several: the comparison folder (./compare)")
    p.add_argument("--what-if-step-ms", type=float, metavar="MS",
                   help="one folder: also compute the scaling model's what-if rows at this "
                        "1-worker step time (e.g. a GPU's measured step), not only at the "
                        "step measured in the folder")
    p.add_argument("--mixed-hardware", action="store_true",
                   help="compare folders recorded on different (or unrecorded) hardware; "
                        "without it such a comparison is refused, since a speed gap "
                        "between machines is not a gap between configurations")
    return p


def hardware_of(folder: Path) -> tuple[str, bool]:
    """The folder's hardware tag (:func:`segcore.host.hardware_tag` of its env.json), and
    whether the env records the machine's identity (CPU family/model or GPU names): a
    tag without it ("cpu-2c-amd-epyc") covers machines that differ 2x in speed."""
    import json

    from segcore.host import hardware_tag

    try:
        env = json.loads((folder / "env.json").read_text())
    except (OSError, ValueError):
        return "unrecorded", False
    if not isinstance(env, dict):
        return "unrecorded", False
    known = bool(env.get("cpu_id") or env.get("cuda_devices") or env.get("nvml_gpus"))
    return hardware_tag(env), known


def check_same_hardware(folders: list[Path]) -> str | None:
    """``None`` when every folder names the same, identified hardware, else the reason
    (one line) a comparison across them would mislead."""
    tags = {f: hardware_of(f) for f in folders}
    unknown = [str(f) for f, (_, known) in tags.items() if not known]
    if unknown:
        return (f"the hardware of {', '.join(unknown)} is not identified (its env.json has "
                "no CPU family/model or GPU name), so its speeds cannot be compared with "
                "another folder's")
    distinct = sorted({t for t, _ in tags.values()})
    if len(distinct) > 1:
        return ("the folders were recorded on different hardware ("
                + "; ".join(f"{f}: {t}" for f, (t, _) in tags.items()) + ")")
    return None


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.what_if_step_ms is not None and not a.what_if_step_ms > 0:
        p.error(f"--what-if-step-ms {a.what_if_step_ms:g}: must be a step time in ms > 0")
    folders = [Path(f) for f in a.folders]
    for f in folders:
        if not f.is_dir():
            print(f"error: {f}: no such folder", file=sys.stderr)
            return 2
        if not (f / "runs.jsonl").is_file():
            print(f"error: {f} has no runs.jsonl: not a results folder", file=sys.stderr)
            return 2
    if len(folders) > 1 and not a.mixed_hardware:
        why = check_same_hardware(folders)
        if why is not None:
            print(f"error: {why}; pass --mixed-hardware to draw the comparison anyway "
                  "(each folder's hardware is then named in compare.md)", file=sys.stderr)
            return 2
    from segcore.results import report

    try:
        if len(folders) == 1:
            path = report.write_report(folders[0], out=a.out,
                                       what_if_step_ms=a.what_if_step_ms)
            plots_dir = path.parent / "plots"
        else:
            path = report.write_compare(folders, Path(a.out or "compare"))
            plots_dir = path.parent
    except OSError as e:
        print(f"error: cannot write {e.filename or 'the report'} ({e.strerror or e}); "
              "pass --out with a writable folder (the results are unchanged)",
              file=sys.stderr)
        return 1
    print(f"wrote {path} and figures in {plots_dir}")
    for f in folders:
        print(summary(f))
    return 0


def summary(folder: Path) -> str:
    """One line per folder: runs, low-confidence runs by flag, the best throughput."""
    from segcore.results import analysis
    from segcore.fmt import fmt
    from segcore.results.rows import read_rows

    d = analysis.frame(read_rows(folder))
    ok = d[d["ok"]]
    counts = {k: int(ok["flags"].str.contains(k).sum()) for k in analysis.FLAGS}
    flags = ", ".join(f"{k} {n}" for k, n in counts.items() if n)
    best = analysis.best_per_objective(d)[0]
    top = (f"{fmt(best.row['throughput_img_s'], '.1f', ' img/s')} "
           f"({best.row['run_id']})") if best.row is not None else f"n/a ({best.note})"
    if best.ties:
        top = f"tied within {best.noise_pct:.1f} %: {top} and {', '.join(best.ties)}"
    return (f"{folder}: {len(ok)}/{len(d)} run(s) ok, "
            f"{int(ok['low_confidence'].sum())} low-confidence"
            + (f" ({flags})" if flags else "") + f"; highest throughput: {top}")


if __name__ == "__main__":
    sys.exit(main())
