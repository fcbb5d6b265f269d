"""The report's scaling-model section: the calibrated model's predictions against the
measured points, its leave-one-out error, the published comparison and the memory model,
with ``scaling_model.png``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from segcore.io import save_figure_atomic
from segcore.registry import COMM_PATTERN_LABELS
from segcore.scaling.model import (ASSUMPTIONS, Bounds, Describe, HiddenFit, Interconnect, Link, PATTERNS, PUBLISHED,
                                   Published, REPORT_WORKERS, WHAT_IF, WORKERS, Workload, _num, _truthy, calibrate,
                                   comm_pattern, comm_times, describe_row, family_key, fit_hidden, leave_one_out,
                                   loo_summary, predict, published_comparison, step_time, uniform_buckets, usable,
                                   workload_from_rows, at_step_time, bounds, held_out_check,
                                   predict_interval)


def report_section(rows: Sequence[Mapping[str, Any]], comm: Mapping[str, Any] | str | Path
                   | None, out_dir: str | Path, link_base: str | Path | None = None,
                   what_if: Sequence[Interconnect] = WHAT_IF,
                   describe: Describe = describe_row,
                   what_if_step_ms: float | None = None) -> str:
    """The report's scaling-model section; draws ``<out_dir>/scaling_model.png``.

    Args:
        rows: result rows (as in runs.jsonl).
        comm: the sweep's commbench result (dict, or a path to ``commbench.json`` or its
            folder); ``None`` or a missing file: communication was not measured, and
            the section says so and how to measure it.
        out_dir: where the figure goes.
        link_base: the folder the markdown is written into (figure links are relative to
            it); default ``out_dir``.
        what_if: interconnects the predictions are also shown for.
        what_if_step_ms: the 1-worker step time (ms) the what-if rows are also computed
            at, e.g. a GPU's measured step; the rows at the step measured here are always
            shown, labelled with it.

    Returns:
        markdown, starting with a ``## Scaling model`` heading.
    """
    from segcore.scaling import memory
    from segcore.scaling.comm import SUMMARY_HEADERS, load_commbench, summary_rows
    from segcore.fmt import markdown_table

    out_dir = Path(out_dir)
    lines = ["## Scaling model: beyond this machine", ""]
    ok = [r for r in rows if usable(r)]
    if any(str(r.get("device_type")) == "cpu" for r in ok):
        lines += ["Measured on CPU worker processes: the model is calibrated on CPU step "
                  "times and a loopback network; its numbers show how this configuration "
                  "would scale with that compute per worker, not GPU performance.", ""]
    if comm is not None and not isinstance(comm, Mapping):
        try:
            comm = load_commbench(comm)
        except FileNotFoundError:
            comm = None  # a sweep that did not measure: the section says how to
    if comm is None or "collectives" not in comm:
        return "\n".join(lines + [_not_measured(comm), ""])
    if not ok:
        return "\n".join(lines + ["No usable rows (ok, with step times): nothing to model.",
                                  ""])
    net = Interconnect.from_commbench(comm)
    workloads, fit = calibrate(ok, net, describe)
    lines += ["### Interconnect", "",
              f"{comm['backend']}, {comm['world_size']} workers on {comm['device']}, "
              f"{comm['repeats']} repeats per size (median, 95 % interval of the median):",
              "", markdown_table(SUMMARY_HEADERS, summary_rows(comm),
                                 ["l", "r", "r", "r", "l"]),
              f"Fitted hidden fraction of overlappable communication: **h = "
              f"{fit.value:.2f}** from {fit.points} multi-worker run(s); {fit.note}.", ""]
    loo = leave_one_out(ok, net, describe)
    summ = loo_summary(loo)
    lines += ["### Prediction error on the measured runs (leave-one-out)", "",
              "Each run is predicted from all the others (h and the 1-worker baseline "
              "refitted without it).", ""]
    lines.append(markdown_table(
        ["run", "workers", "measured step (ms)", "predicted (ms)", "error", "measured img/s",
         "predicted img/s", "error", "baseline"],
        [[x["run_id"], x["world_size"], _f(x["measured_step_ms"], ".1f"),
          _f(x["predicted_step_ms"], ".1f"), _f(x["step_err_pct"], "+.1f", " %"),
          _f(x["measured_img_s"], ".2f"), _f(x["predicted_img_s"], ".2f"),
          _f(x["img_s_err_pct"], "+.1f", " %"), x["basis"]] for x in loo],
        ["l", "r", "r", "r", "r", "r", "r", "r", "l"]))
    lines.append("Mean absolute error: " + "; ".join(
        f"{'all runs' if k == 'all' else f'{k} worker(s)'}: step {_f(v['step'][0], '.1f')} %, "
        f"throughput {_f(v['img_s'][0], '.1f')} % ({v['step'][1]} run(s))"
        for k, v in summ.items()) + ".")
    lines.append("")
    b = bounds(ok, fit, loo)
    lines += _held_out_lines(ok, net, describe)
    cols = [f"{p}" for p in REPORT_WORKERS]
    align = ["l", "l"] + ["r"] * len(REPORT_WORKERS)
    table, what, curves = [], [], []
    for key, w in sorted(workloads.items(), key=lambda kv: kv[1].label):
        pats = _patterns_for(key[0], key[1])
        for pat in pats:
            table.append([w.label, _pattern_name(pat)] + _effs(w, pat, net, fit.value, b))
            curves.append((w, pat))
        steps = [("measured here", w)]
        if what_if_step_ms is not None:
            steps.append(("given", at_step_time(w, what_if_step_ms)))
        for n in what_if:
            for kind, ww in steps:
                what.append([w.label, n.name, f"{ww.step_s * 1e3:.1f} ({kind})"]
                            + _effs(ww, pats[0], n, fit.value, b))
    table.append(["", "extrapolation"] + [
        "measured" if b.extrapolation(p) <= 1 else f"x{b.extrapolation(p):.0f}"
        for p in REPORT_WORKERS])
    lines += ["### Predicted weak-scaling efficiency", "",
              f"On the measured interconnect, h = {fit.value:.2f}: each family as measured and "
              "as the other engines would run it. In brackets the prediction interval: "
              f"{b.note}. Measured up to {b.measured_max} worker(s): the last row says how "
              "far each column lies beyond that (an extrapolation, not a measurement).", "",
              markdown_table(["family", "engine"] + cols, table, align)]
    if what:
        cpu = any(str(r.get("device_type")) == "cpu" for r in ok)
        lines += ["The measured engine on other interconnects (what-if), at the 1-worker "
                  "step time (ms) named in the third column"
                  + (": the step measured here is a CPU step, 10-100x a GPU's, and a "
                     "shorter step leaves communication that much more exposed. Pass "
                     "`--what-if-step-ms MS` to `launch/plot.py` to see these rows at a "
                     "GPU's measured step." if cpu and what_if_step_ms is None else "."),
                  "", markdown_table(["family", "interconnect", "step (ms)"] + cols, what,
                                     ["l", "l", "l"] + align[2:])]
    fig = plot_scaling(ok, workloads, curves, net, fit.value, out_dir / "scaling_model.png",
                       describe, bounds_=b)
    rel = Path(_relpath(fig, link_base or out_dir))
    lines += [f"![scaling model]({rel.as_posix()})", "",
              "Lines: the model (weak scaling to 1,024 workers on the measured interconnect; "
              "strong scaling at a global batch of 1,024), bands: its prediction interval; "
              "points: measured runs; the shaded region lies beyond the measured worker "
              "counts.", ""]
    lines += _published_lines()
    lines += ["### Assumptions", ""]
    lines += [f"- {a}" for a in ASSUMPTIONS]
    lines += ["", memory.report_section(ok, describe=describe)]
    return "\n".join(lines)


def _not_measured(comm: Mapping[str, Any] | None) -> str:
    """Why the section has no model: the interconnect was not measured, or failed."""
    how = ("so the model has no interconnect to calibrate on and draws no prediction; "
           "measure it with `python launch/commbench.py --workers N --out <this folder>` "
           "(or `--resume` the sweep)")
    if comm is None:
        return f"The interconnect was not measured for this sweep, {how}."
    if "failed" in comm:
        log = f" (workers' output: `{comm['log']}`)" if comm.get("log") else ""
        return (f"The interconnect could not be measured for this sweep: {comm['failed']}"
                f"{log}; {how}.")
    return f"The interconnect was not measured for this sweep ({comm.get('skipped')}), {how}."


def _effs(w: Workload, pattern: str, net: Interconnect, hidden: float, b: Bounds
          ) -> list[str | None]:
    """Efficiency cells with their interval: ``93 % (81-100)``."""
    def cell(x: Mapping[str, float]) -> str | None:
        mid, lo, hi = (f"{x[k] * 100:.0f}" for k in ("efficiency", "efficiency_lo",
                                                     "efficiency_hi"))
        if _f(x["efficiency"], ".2f") is None:
            return None
        return f"{mid} %" if lo == hi == mid else f"{mid} % ({lo}-{hi})"

    return [cell(x) for x in predict_interval(w, pattern, net, hidden, b, REPORT_WORKERS)]


def _held_out_lines(ok: Sequence[Mapping[str, Any]], net: Interconnect,
                    describe: Describe) -> list[str]:
    """The held-out check: fit without the largest worker count, predict it."""
    from segcore.fmt import markdown_table

    check = held_out_check(ok, net, describe)
    if check is None:
        counts = sorted({int(_num(r["world_size"])) for r in ok})
        return ["### Held-out check", "",
                f"Not run: it needs three or more measured worker counts, and this sweep "
                f"measured {len(counts)} ({', '.join(map(str, counts))}). Until then the "
                "predictions beyond the measured counts rest on the fit alone.", ""]
    runs = check["runs"]
    inside = sum(1 for r in runs if r["inside"])
    return ["### Held-out check", "",
            f"Fitted on {', '.join(map(str, check['fit_on']))} worker(s) only, then asked "
            f"for {check['held_out']}: {inside} of {len(runs)} measured run(s) fall inside "
            f"the interval ({check['bounds'].note}).", "",
            markdown_table(["run", "measured img/s", "predicted img/s", "interval",
                            "error", "inside"],
                           [[r["run_id"], _f(r["measured_img_s"], ".2f"),
                             _f(r["predicted_img_s"], ".2f"),
                             f"{r['lo']:.2f}-{r['hi']:.2f}", _f(r["err_pct"], "+.1f", " %"),
                             "yes" if r["inside"] else "**no**"] for r in runs],
                           ["l", "r", "r", "r", "r", "l"]), ""]


def _published_lines() -> list[str]:
    """The model run on published scaling figures (their compute and network as inputs)."""
    from segcore.fmt import markdown_table

    rows, _ = published_comparison()
    return ["### The model on published scaling figures", "",
            "Each published figure's 1-GPU throughput, model size, batch and interconnect "
            "put into the same model: with no overlap (h = 0), all the overlap backward "
            "allows (h = 1), and h fitted on the other figures of its group. Sources and "
            "derivations: docs/scaling.md.", "",
            markdown_table(["published figure", "published", "h = 0", "h = 1", "h fitted"],
                           [[r["name"], _f(r["published"] * 100, ".0f", " %"),
                             _f(r["h0"] * 100, ".0f", " %"), _f(r["h1"] * 100, ".0f", " %"),
                             _f(r.get("fitted", math.nan) * 100, ".0f", " %") or "-"]
                            for r in rows], ["l", "r", "r", "r", "r"]), ""]


def _patterns_for(engine: str, stage: int) -> list[str]:
    """The measured engine's own pattern first, then the others the user could choose."""
    own = comm_pattern(engine, stage)
    others = [p for p in PATTERNS if p != "none"]
    return [own] + [p for p in others if p != own] if own != "none" else others


def _pattern_name(pattern: str) -> str:
    return COMM_PATTERN_LABELS[pattern]


def _f(v: Any, spec: str, suffix: str = "") -> str | None:
    f = _num(v)
    return None if not math.isfinite(f) else format(f, spec) + suffix


def _relpath(path: Path, base: str | Path) -> str:
    import os

    return os.path.relpath(path, base)


def plot_scaling(rows: Sequence[Mapping[str, Any]], workloads: Mapping[tuple, Workload],
                 curves: Sequence[tuple[Workload, str]], net: Interconnect, hidden: float,
                 path: str | Path, describe: Describe = describe_row,
                 global_batch: float = 1024.0, bounds_: Bounds | None = None) -> Path:
    """Three panels: weak-scaling throughput and efficiency (1 to 1,024 workers) and
    strong-scaling efficiency; lines predicted with their interval as a band
    (``bounds_``), points measured (efficiency against the family's measured 1-worker
    throughput), the worker counts beyond the measured ones shaded."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.6))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    colors: dict[str, Any] = {}
    banded: set[str] = set()
    for w, pat in curves:
        label = f"{w.label} as {_pattern_name(pat)}"
        weak = (predict_interval(w, pat, net, hidden, bounds_) if bounds_ is not None
                else predict(w, pat, net, hidden))
        ls = {"allreduce": "-", "zero12": "--", "sharded": ":", "none": "-"}[pat]
        xs = [x["workers"] for x in weak]
        line = axes[0].plot(xs, [x["throughput_img_s"] for x in weak],
                            ls, label=label, color=colors.get(w.label))[0]
        colors.setdefault(w.label, line.get_color())
        axes[1].plot(xs, [x["efficiency"] for x in weak], ls, color=colors[w.label])
        own = w.label not in banded  # each family's first curve: its measured engine
        banded.add(w.label)
        if bounds_ is not None and own:
            for ax, k in ((axes[0], "throughput_img_s"), (axes[1], "efficiency")):
                ax.fill_between(xs, [x[f"{k}_lo"] for x in weak],
                                [x[f"{k}_hi"] for x in weak], color=colors[w.label],
                                alpha=0.12, lw=0)
        strong = predict(w, pat, net, hidden, global_batch=global_batch)
        axes[2].plot([x["workers"] for x in strong], [x["efficiency"] for x in strong], ls,
                     color=colors[w.label])
    top = 1.1
    for r in rows:
        w = workloads.get(family_key(r))
        if w is None or _truthy(r.get("strong_scaling")):
            continue
        thr = _num(r.get("throughput_img_s"))
        p = _num(r["world_size"])
        base = w.throughput_ratio * w.batch / w.step_s
        axes[0].plot([p], [thr], "o", ms=5, color=colors.get(w.label, "k"))
        axes[1].plot([p], [thr / (p * base)], "o", ms=5, color=colors.get(w.label, "k"))
        if math.isfinite(thr):
            top = max(top, thr / (p * base) + 0.1)  # a noisy point above 1 stays visible
    for ax, title, ylab in ((axes[0], "weak scaling: throughput", "images/s"),
                            (axes[1], "weak scaling: efficiency", "efficiency"),
                            (axes[2], f"strong scaling, global batch {global_batch:.0f}",
                             "efficiency")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers")
        ax.set_ylabel(ylab)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    if bounds_ is not None:
        for ax in axes:
            ax.axvspan(bounds_.measured_max, max(WORKERS), color="0.85", alpha=0.35, lw=0,
                       label=None)
        axes[0].plot([], [], "o", color="k", ms=5, label="measured")
        axes[0].fill_between([], [], [], color="0.5", alpha=0.3, label="model interval")
    axes[1].set_ylim(0, top)
    axes[2].set_ylim(0, 1.1)
    axes[0].legend(fontsize=6, loc="upper left")
    fig.suptitle(f"Scaling model on {net.name}, h = {hidden:.2f} (lines: model"
                 + ("; bands: its interval; grey: beyond the measured worker counts"
                    if bounds_ is not None else "") + "; points: measured)", fontsize=9)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


__all__ = ["PATTERNS", "WORKERS", "comm_pattern", "Link", "Interconnect", "Workload",
           "uniform_buckets", "comm_times", "step_time", "predict", "usable", "family_key",
           "workload_from_rows", "calibrate", "fit_hidden", "HiddenFit", "leave_one_out",
           "loo_summary", "Published", "PUBLISHED", "published_comparison", "ASSUMPTIONS",
           "report_section", "plot_scaling"]
