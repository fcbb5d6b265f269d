"""The report's scaling-model section: the calibrated model's predictions against the
measured points, its leave-one-out error, the published comparison and the memory model,
with ``scaling_model.png``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from segcore.io import save_figure_atomic
from segcore.registry import COMM_PATTERN_LABELS
from segcore.scaling.model import (ASSUMPTIONS, Describe, HiddenFit, Interconnect, Link, PATTERNS, PUBLISHED,
                                   Published, REPORT_WORKERS, WHAT_IF, WORKERS, Workload, _num, _truthy, calibrate,
                                   comm_pattern, comm_times, describe_row, family_key, fit_hidden, leave_one_out,
                                   loo_summary, predict, published_comparison, step_time, uniform_buckets, usable,
                                   workload_from_rows)


def report_section(rows: Sequence[Mapping[str, Any]], comm: Mapping[str, Any] | str | Path
                   | None, out_dir: str | Path, link_base: str | Path | None = None,
                   what_if: Sequence[Interconnect] = WHAT_IF,
                   describe: Describe = describe_row) -> str:
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
    cols = [f"{p}" for p in REPORT_WORKERS]
    align = ["l", "l"] + ["r"] * len(REPORT_WORKERS)
    table, what, curves = [], [], []
    for key, w in sorted(workloads.items(), key=lambda kv: kv[1].label):
        pats = _patterns_for(key[0], key[1])
        for pat in pats:
            table.append([w.label, _pattern_name(pat)] + _effs(w, pat, net, fit.value))
            curves.append((w, pat))
        for n in what_if:
            what.append([w.label, n.name] + _effs(w, pats[0], n, fit.value))
    lines += ["### Predicted weak-scaling efficiency", "",
              f"On the measured interconnect, h = {fit.value:.2f}: each family as measured and "
              "as the other engines would run it.", "",
              markdown_table(["family", "engine"] + cols, table, align)]
    if what:
        lines += ["The measured engine on other interconnects (what-if):", "",
                  markdown_table(["family", "interconnect"] + cols, what, align)]
    fig = plot_scaling(ok, workloads, curves, net, fit.value, out_dir / "scaling_model.png",
                       describe)
    rel = Path(_relpath(fig, link_base or out_dir))
    lines += [f"![scaling model]({rel.as_posix()})", "",
              "Lines: the model (weak scaling to 1,024 workers on the measured interconnect; "
              "strong scaling at a global batch of 1,024); points: measured runs.", "",
              "### Assumptions", ""]
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


def _effs(w: Workload, pattern: str, net: Interconnect, hidden: float) -> list[str | None]:
    return [_f(x["efficiency"] * 100, ".0f", " %")
            for x in predict(w, pattern, net, hidden, REPORT_WORKERS)]


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
                 global_batch: float = 1024.0) -> Path:
    """Three panels: weak-scaling throughput and efficiency (1 to 1,024 workers) and
    strong-scaling efficiency; lines predicted, points measured (efficiency against the
    family's measured 1-worker throughput)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.6))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    colors: dict[str, Any] = {}
    for w, pat in curves:
        label = f"{w.label} as {_pattern_name(pat)}"
        weak = predict(w, pat, net, hidden)
        ls = {"allreduce": "-", "zero12": "--", "sharded": ":", "none": "-"}[pat]
        line = axes[0].plot([x["workers"] for x in weak], [x["throughput_img_s"] for x in weak],
                            ls, label=label, color=colors.get(w.label))[0]
        colors.setdefault(w.label, line.get_color())
        axes[1].plot([x["workers"] for x in weak], [x["efficiency"] for x in weak], ls,
                     color=colors[w.label])
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
    axes[1].set_ylim(0, top)
    axes[2].set_ylim(0, 1.1)
    axes[0].legend(fontsize=6, loc="upper left")
    fig.suptitle(f"Scaling model on {net.name}, h = {hidden:.2f} (lines: model; points: "
                 "measured)", fontsize=9)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


__all__ = ["PATTERNS", "WORKERS", "comm_pattern", "Link", "Interconnect", "Workload",
           "uniform_buckets", "comm_times", "step_time", "predict", "usable", "family_key",
           "workload_from_rows", "calibrate", "fit_hidden", "HiddenFit", "leave_one_out",
           "loo_summary", "Published", "PUBLISHED", "published_comparison", "ASSUMPTIONS",
           "report_section", "plot_scaling"]
