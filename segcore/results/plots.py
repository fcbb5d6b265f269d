"""Figures of a results table: scaling, throughput, memory, accuracy and its Pareto front.

Figures only draw: every number they show comes from the analysed frame of
:mod:`segcore.results.analysis` (speedup, efficiency, the hardware ceiling, confidence
intervals, low-confidence flags, the memory figure, the Pareto front). Only rows with
status ok are drawn. Rows are grouped into *families* (configurations identical in
everything but the axis a figure varies); one line per family, labelled only with the
columns that differ between the families shown (:mod:`segcore.results.labels`). Repeats
of one configuration are drawn as their median; the bar spans the repeats and, where
recorded, the 95 % confidence intervals. A point that rests on a low-confidence row is
drawn hollow.

A figure whose data is missing (one worker count, no accuracy, nothing ok) is still
written, as a panel that says ``not enough data: ...``, so that a results folder always
holds the same files and the reader learns why a figure is empty; the returned
:class:`PlotResult` carries the same note for the report.

Figures are drawn on :class:`matplotlib.figure.Figure` objects, never through pyplot,
so no backend or global figure state is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from segcore.fmt import fmt
from segcore.results import analysis
from segcore.results.analysis import family_keys, norm, sort_key, truthy
from segcore.results.caveats import is_cpu, read_env
from segcore.results.labels import (describe_keys, folder_labels, piece,
                                  seconds)
from segcore.results.panels import (HOLLOW, Group, Line, Metric, grid, palette, render, save,
                                  suptitle)
from segcore.results.rows import read_rows

__all__ = [
    "PLOT_NAMES", "PLOT_TITLES", "PlotResult", "plot_speedup", "plot_efficiency",
    "plot_throughput_vs_batch", "plot_memory", "plot_accuracy_vs_depth", "plot_pareto",
    "plot_all", "plot_compare",
]

PLOT_NAMES = ("speedup", "efficiency", "throughput_vs_batch", "memory", "accuracy_vs_depth",
              "pareto")
PLOT_TITLES = {
    "speedup": "Speedup vs number of workers",
    "efficiency": "Scaling efficiency vs number of workers",
    "throughput_vs_batch": "Training throughput vs per-worker batch size",
    "memory": "Peak memory per worker vs batch size and depth",
    "accuracy_vs_depth": "Validation accuracy vs U-Net depth",
    "pareto": "Accuracy vs training time (Pareto front)",
}

Sources = Union[pd.DataFrame, Sequence[tuple[str, pd.DataFrame]]]


@dataclass(frozen=True)
class PlotResult:
    """One written figure.

    Attributes:
        name: one of :data:`PLOT_NAMES`.
        path: the PNG written.
        note: ``None`` when the figure shows data; otherwise why it does not (the PNG
            then shows the same sentence).
    """

    name: str
    path: Path
    note: str | None = None


# --------------------------------------------------------------------------- collecting


def _sources(data: Sources) -> list[tuple[str | None, pd.DataFrame]]:
    if isinstance(data, pd.DataFrame):
        return [(None, analysis.analysed(data))]
    return [(label, analysis.analysed(df)) for label, df in data]


def _collect(sources: list[tuple[str | None, pd.DataFrame]], x: str, y: str,
             key_cols: Sequence[str], scale: float = 1.0, ci: str | None = None
             ) -> list[Line]:
    """Median ``y`` per ``x``, one line per source and key; ok rows with finite x and y
    only. The bar spans the repeats' values and, with ``ci``, the columns ``<ci>_lo``
    and ``<ci>_hi`` of every repeat."""
    lines = []
    for si, (_, d) in enumerate(sources):
        sel = d[d["ok"] & np.isfinite(d[x]) & np.isfinite(d[y])] if len(d) else d
        if not len(sel):
            continue
        for k, g in sel.groupby(pd.Series(family_keys(sel, key_cols), index=sel.index,
                                          dtype=object), sort=False):
            by_x = g.groupby(x)
            agg = by_x[y].agg(["median", "min", "max"]).sort_index()
            lo, hi = agg["min"], agg["max"]
            if ci is not None:
                lo = np.fmin(lo, by_x[f"{ci}_lo"].min().reindex(agg.index))
                hi = np.fmax(hi, by_x[f"{ci}_hi"].max().reindex(agg.index))
            lines.append(Line(si, k, agg.index.to_numpy(float),
                              agg["median"].to_numpy(float) * scale,
                              lo.to_numpy(float) * scale, hi.to_numpy(float) * scale,
                              by_x["low_confidence"].any().reindex(agg.index)
                              .to_numpy(bool),
                              by_x["nnodes"].max().reindex(agg.index).to_numpy(float)))
    lines.sort(key=lambda ln: (ln.source, sort_key(ln.key)))
    return lines


def _key_cols(cols: Sequence[str], exclude: Sequence[str], with_world: bool,
              sources: list[tuple[str | None, pd.DataFrame]] | None = None) -> list[str]:
    """The columns that key a figure's lines: ``cols`` less ``exclude`` (the x axis and
    what follows from it), plus ``world_size``.

    With ``sources``, an excluded column that is *not* determined by the x axis (the
    first of ``exclude``) is kept in the key: two widths at one depth are two
    configurations, two lines, never one averaged point that no run produced.
    """
    drop = list(exclude)
    if sources is not None and exclude:
        x, rest = exclude[0], exclude[1:]
        keep = _key_cols(cols, exclude, with_world)
        drop = [x] + [c for c in rest if not _varies_at_fixed_x(sources, x, c, keep)]
    out = [c for c in cols if c not in drop]
    if with_world and "world_size" not in drop and "world_size" not in out:
        out.append("world_size")
    return out


def _varies_at_fixed_x(sources: list[tuple[str | None, pd.DataFrame]], x: str, col: str,
                       key: Sequence[str]) -> bool:
    """Whether ok rows of one line (``key``) and one ``x`` differ in ``col``."""
    for _, d in sources:
        if not len(d) or col not in d or x not in d:
            continue
        ok = d[d["ok"]]
        if not len(ok):
            continue
        k = pd.Series(family_keys(ok, list(key)), index=ok.index, dtype=object)
        vals = ok[col].map(lambda v: norm(v))
        per = vals.groupby([k, ok[x]], sort=False).nunique(dropna=False)
        if len(per) and int(per.max()) > 1:
            return True
    return False


def _all_family_cols(sources: list[tuple[str | None, pd.DataFrame]]) -> list[str]:
    cols = [c for _, d in sources for c in analysis.family_columns(d)]
    return list(dict.fromkeys(cols))


def accuracy_basis(sources: list[tuple[str | None, pd.DataFrame]]) -> str:
    """What an accuracy figure rests on: validation images and the data's source, from
    the rows (``val_images``, ``data_source``); "not recorded" for older folders."""
    sizes: set[int] = set()
    srcs: set[str] = set()
    for _, d in sources:
        if not len(d):
            continue
        ok = d[d["ok"]]
        for v in ok["val_images"] if "val_images" in ok else []:
            if v == v and v is not None:
                sizes.add(int(v))
        for v in ok["data_source"] if "data_source" in ok else []:
            if isinstance(v, str) and v:
                srcs.add("synthetic scenes" if v == "synthetic" else Path(v).name or v)
    n = ("validation size not recorded" if not sizes else
         f"{min(sizes)} validation image(s)" if len(sizes) == 1 else
         f"{min(sizes)}-{max(sizes)} validation images")
    return f"accuracy on {n} from {', '.join(sorted(srcs)) or 'an unrecorded source'}"


def _note_figure(name: str, path: Path, note: str, context: str | None) -> PlotResult:
    fig = Figure(figsize=(7.5, 3.0), layout="constrained")
    suptitle(fig, [PLOT_TITLES[name], context])
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, f"not enough data: {note}", ha="center", va="center", wrap=True,
            fontsize=10, color="0.3", transform=ax.transAxes)
    save(fig, path)
    return PlotResult(name, path, note)


def _no_ok_note(sources) -> str | None:
    """The note for a table without any ok row, naming the statuses found."""
    if sum(int(d["ok"].sum()) for _, d in sources if len(d)):
        return None
    statuses: dict[str, int] = {}
    for _, d in sources:
        for s in d["status"] if len(d) else []:
            s = norm(s) or "unknown"
            statuses[s] = statuses.get(s, 0) + 1
    if not statuses:
        return "the results table has no rows"
    found = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    return f"no successful (status ok) runs; found {found}"


def _values(sources, col: str, require: str | None = None) -> list[float]:
    out: list[float] = []
    for _, d in sources:
        if not len(d):
            continue
        sel = d[d["ok"] & np.isfinite(d[col])]
        if require is not None:
            sel = sel[np.isfinite(sel[require])]
        out.extend(sel[col].tolist())
    return sorted(set(out))


def _fmt_list(vals: Iterable[float]) -> str:
    return ", ".join(fmt(v, "g") for v in vals)


def _ideal_handle(label: str):
    return Line2D([], [], color="0.25", linestyle="--", linewidth=1.2, label=label)


# --------------------------------------------------------------------------- figures


def _scaling(data: Sources, path: Path, context: str | None, efficiency: bool
             ) -> PlotResult:
    name = "efficiency" if efficiency else "speedup"
    path = Path(path)
    sources = _sources(data)
    note = _no_ok_note(sources)
    cols = _all_family_cols(sources)
    y = "scaling_efficiency" if efficiency else "speedup"
    lines = _collect(sources, "world_size", y, cols, scale=100.0 if efficiency else 1.0,
                     ci=f"{y}_ci95")
    shown = [ln for ln in lines if len(ln.x) >= 2]
    if note is None and not shown:
        ws = _values(sources, "world_size", require="throughput_img_s")
        if len(ws) < 2:
            note = (f"only one worker count measured ({_fmt_list(ws) or 'none'}); speedup "
                    "needs a configuration run at 1 worker and at more workers")
        elif 1 not in ws:
            note = (f"no 1-worker baseline: worker counts measured {_fmt_list(ws)}; add "
                    "1-worker runs of the same configurations (--gpus 1,...)")
        else:
            note = ("no configuration was measured both at 1 worker and at more workers "
                    f"(worker counts measured: {_fmt_list(ws)})")
    if note is not None:
        return _note_figure(name, path, note, context)
    top_x = max(float(v) for ln in shown for v in ln.x)
    ceilings = _ceilings(sources, efficiency)

    def decorate(ax, ls: list[Line]) -> None:
        top = max(float(np.nanmax(np.fmax(ln.hi, ln.y))) for ln in ls)
        if efficiency:
            ax.axhline(100.0, color="0.25", linestyle="--", linewidth=1.2, zorder=1)
            ax.set_ylim(0, max(110.0, top * 1.08))
        else:
            ax.plot([1, top_x], [1, top_x], color="0.25", linestyle="--", linewidth=1.2,
                    zorder=1)
            ax.set_ylim(0, max(top_x, top) * 1.08)
        for ws, ceil in ceilings:
            ax.plot(ws, ceil, color=_CEILING_COLOUR, linestyle=":", linewidth=1.8,
                    zorder=1)

    metric = Metric(shown, "scaling efficiency (%; speedup / workers)" if efficiency
                     else "speedup over 1 worker (× throughput)", decorate=decorate)
    handles = [_ideal_handle("ideal (100 %)" if efficiency
                             else "ideal (speedup = workers)")]
    if ceilings:
        handles.append(Line2D([], [], color=_CEILING_COLOUR, linestyle=":", linewidth=1.8,
                              label="hardware ceiling (parallel workers the host runs)"))
    group = Group(cols, "workers (world size)", [metric], annotate_nodes=True,
                   extra_handles=handles)
    hidden = len(lines) - len(shown)
    notes = [f"{hidden} configuration(s) measured at one worker count only are not shown"] \
        if hidden else []
    render(path, PLOT_TITLES[name] + _scaling_kind(sources), context, [group], sources,
            notes)
    return PlotResult(name, path)


_CEILING_COLOUR = "firebrick"


def _ceilings(sources, efficiency: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per folder that records it, the hardware ceiling vs worker count (speedup, or
    efficiency in %)."""
    out = []
    for _, d in sources:
        sel = d[d["ok"] & np.isfinite(d["hw_ceiling_speedup"])] if len(d) else d
        if len(sel):
            c = sel.groupby("world_size")["hw_ceiling_speedup"].min().sort_index()
            ws = c.index.to_numpy(float)
            out.append((ws, c.to_numpy(float) / ws * 100 if efficiency
                        else c.to_numpy(float)))
    return out


def _scaling_kind(sources) -> str:
    kinds = set()
    for _, d in sources:
        if len(d):
            kinds |= {truthy(v) for v in d.loc[d["ok"], "strong_scaling"]}
    if kinds == {False}:
        return " (weak scaling: fixed batch per worker)"
    if kinds == {True}:
        return " (strong scaling: fixed global batch)"
    return ""


def plot_speedup(data: Sources, path: str | Path, context: str | None = None) -> PlotResult:
    """Speedup over the 1-worker run vs workers, one line per family, with y = x.

    Args:
        data: a results table, or ``[(label, table), ...]`` to compare folders (one
            colour per folder).
        path: the PNG to write.
        context: a line under the title (sweep, hardware); see :func:`describe_context`.

    Returns:
        the figure written; ``note`` says why it shows no data, if it does not.
    """
    return _scaling(data, path, context, efficiency=False)


def plot_efficiency(data: Sources, path: str | Path, context: str | None = None
                    ) -> PlotResult:
    """Scaling efficiency (speedup / workers, in %) vs workers, with the 100 % line.

    Args and Returns: as :func:`plot_speedup`.
    """
    return _scaling(data, path, context, efficiency=True)


def plot_throughput_vs_batch(data: Sources, path: str | Path, context: str | None = None
                             ) -> PlotResult:
    """Throughput (img/s, all workers together) vs per-worker batch size; one line per
    worker count and family.

    Args and Returns: as :func:`plot_speedup`.
    """
    name = "throughput_vs_batch"
    path = Path(path)
    sources = _sources(data)
    note = _no_ok_note(sources)
    cols = _key_cols(_all_family_cols(sources), ("batch_size",), with_world=True)
    lines = _collect(sources, "batch_size", "throughput_img_s", cols,
                     ci="throughput_ci95")
    if note is None and not any(len(ln.x) >= 2 for ln in lines):
        bs = _values(sources, "batch_size", require="throughput_img_s")
        note = (f"only one batch size measured per configuration ({_fmt_list(bs) or 'none'}"
                "); run the sweep with --batch-sizes A,B")
    if note is not None:
        return _note_figure(name, path, note, context)

    ys = np.array([v for ln in lines for v in ln.y if v > 0])
    # Folders of very different speed (a CPU run beside a GPU run) stay readable on a
    # log axis; within one folder a linear axis from 0 shows the gains truthfully.
    log_y = len(ys) and ys.max() / ys.min() > 30

    def decorate(ax, ls: list[Line]) -> None:
        if log_y:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)

    group = Group(cols, "batch size per worker (images)",
                   [Metric(lines, "throughput (images/s, all workers)"
                            + (", log scale" if log_y else ""), decorate=decorate)],
                   log2_from=4)
    render(path, PLOT_TITLES[name], context, [group], sources)
    return PlotResult(name, path)


_MEM_SOURCES = {
    "workload": "workload: peak above the process baseline after imports and model build",
    "allocator": "allocator peak",
    "host_peak_rss": "host peak RSS of the process, imported libraries included",
}


def _memory_source_text(sources) -> str:
    found = set()
    for _, d in sources:
        if not len(d):
            continue
        sel = d[d["ok"] & np.isfinite(d["memory_mb"])]
        found |= set(sel["memory_source"])
    found.discard(None)
    if not found:
        return "source not recorded"
    return " / ".join(_MEM_SOURCES.get(s, str(s)) for s in sorted(found))


def plot_memory(data: Sources, path: str | Path, context: str | None = None) -> PlotResult:
    """Peak memory per worker (MiB, max over ranks and phases) vs batch size (left) and depth
    (right): ``memory_mb`` of the analysed frame (the workload's peak above the process
    baseline where recorded, else ``peak_mem_mb``); the title names the measurement.

    Args and Returns: as :func:`plot_speedup`.
    """
    name = "memory"
    path = Path(path)
    sources = _sources(data)
    note = _no_ok_note(sources)
    fam = _all_family_cols(sources)
    by_batch = _key_cols(fam, ("batch_size",), with_world=True)
    by_depth = _key_cols(fam, ("depth", "widths", "params"), with_world=True,
                         sources=sources)
    lines_b = _collect(sources, "batch_size", "memory_mb", by_batch)
    lines_d = _collect(sources, "depth", "memory_mb", by_depth)
    if note is None and not lines_b and not lines_d:
        note = "no ok run recorded peak_mem_mb or mem_workload_mb"
    if note is not None:
        return _note_figure(name, path, note, context)

    def decorate(ax, ls: list[Line]) -> None:
        ax.set_ylim(bottom=0)

    ylabel = "peak memory per worker (MiB, max over phases)"
    groups = [
        Group(by_batch, "batch size per worker (images)",
               [Metric(lines_b, ylabel, decorate=decorate)], title="vs batch size",
               log2_from=4, empty_note="no batch size recorded"),
        Group(by_depth, "U-Net depth (levels)", [Metric(lines_d, ylabel,
                                                          decorate=decorate)],
               title="vs depth", log2_from=math.inf, empty_note="no depth recorded"),
    ]
    render(path, f"{PLOT_TITLES[name]} ({_memory_source_text(sources)})", context,
            groups, sources)
    return PlotResult(name, path)


def plot_accuracy_vs_depth(data: Sources, path: str | Path, context: str | None = None
                           ) -> PlotResult:
    """Validation mIoU and mDice vs U-Net depth (a column of panels each), one line per
    family; rows without accuracy (throughput-only runs) are left out.

    Args and Returns: as :func:`plot_speedup`.
    """
    name = "accuracy_vs_depth"
    path = Path(path)
    sources = _sources(data)
    note = _no_ok_note(sources)
    cols = _key_cols(_all_family_cols(sources), ("depth", "widths", "params"), sources=sources,
                     with_world=True)
    miou = _collect(sources, "depth", "mIoU", cols)
    dice = _collect(sources, "depth", "mDice", cols)
    context = "; ".join(x for x in (context, accuracy_basis(sources)) if x)
    if note is None and not miou:
        note = "no ok run measured accuracy (mIoU); run the sweep with --mode accuracy|both"
    if note is not None:
        return _note_figure(name, path, note, context)
    every = miou + dice
    lo = min(float(np.nanmin(ln.lo)) for ln in every)
    hi = max(float(np.nanmax(ln.hi)) for ln in every)
    pad = max(0.02, 0.08 * (hi - lo))

    def decorate(ax, ls: list[Line]) -> None:
        # Zoomed to the data (clamped to [0, 1]): differences of a few points matter.
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))

    metrics = [Metric(miou, "validation mIoU (mean IoU over classes)", "mIoU", decorate)]
    if dice:
        metrics.append(Metric(dice, "validation mDice (mean Dice = F1 over classes)",
                               "mDice", decorate))
    group = Group(cols, "U-Net depth (levels)", metrics, log2_from=math.inf,
                   empty_note="no accuracy in this panel")
    render(path, PLOT_TITLES[name], context, [group], sources)
    return PlotResult(name, path)


def plot_pareto(data: Sources, path: str | Path, context: str | None = None) -> PlotResult:
    """mIoU vs training time, one point per ok run with accuracy, coloured by worker
    count (by folder when comparing), low-confidence runs hollow; the Pareto front of
    the analysed frame (``pareto``: no other trustworthy run is both faster and more
    accurate; low-confidence and not-converged runs are never on it) drawn as a step
    line, its runs labelled.

    Args and Returns: as :func:`plot_speedup`.
    """
    name = "pareto"
    path = Path(path)
    sources = _sources(data)
    note = _no_ok_note(sources)
    cols = _all_family_cols(sources) + ["world_size"]
    pts = []
    for si, (_, d) in enumerate(sources):
        if len(d):
            sel = d[d["ok"] & np.isfinite(d["train_time_s"]) & np.isfinite(d["mIoU"])
                    & (d["train_time_s"] > 0)]
            if len(sel):
                pts.append((si, sel))
    if note is None and not pts:
        note = "no ok run recorded both mIoU and train_time_s"
    context = "; ".join(x for x in (context, accuracy_basis(sources)) if x)
    if note is not None:
        return _note_figure(name, path, note, context)
    fig = Figure(figsize=(11.5, 6.0), layout="constrained")
    suptitle(fig, [PLOT_TITLES[name], context])
    ax = fig.subplots()
    multi = len(sources) > 1
    if multi:
        # The folder label already names what is constant within each folder (device).
        cols = [c for c in cols if c == "world_size" or any(
            len({norm(v) for v in sel[c]} - {None}) > 1 for _, sel in pts if c in sel)]
    all_keys = [k for _, sel in pts for k in family_keys(sel, cols)]
    descs = describe_keys(all_keys, cols, always=("world_size",))
    text_of = {k: ", ".join(d.values()) for k, d in zip(all_keys, descs)}
    ws_all = sorted({w for _, sel in pts for w in sel["world_size"] if np.isfinite(w)})
    ws_colour = dict(zip(ws_all, palette(len(ws_all))))
    src_colour = palette(len(sources))
    front_entries: list[tuple[Any, str]] = []
    for si, sel in pts:
        t = sel["train_time_s"].to_numpy(float)
        s = sel["mIoU"].to_numpy(float)
        w = sel["world_size"].to_numpy(float)
        weak = sel["low_confidence"].to_numpy(bool)
        front = sel["pareto"].to_numpy(bool)
        keys = family_keys(sel, cols)
        if multi:
            _scatter(ax, t, s, weak, src_colour[si], f"{sources[si][0]}: runs", 0.45)
            front_colour = src_colour[si]
        else:
            for wv in ws_all:
                m = w == wv
                _scatter(ax, t[m], s[m], weak[m], ws_colour[wv],
                         piece("world_size", norm(wv), {}))
            m = ~np.isfinite(w)
            _scatter(ax, t[m], s[m], weak[m], "0.5", "workers ?")
            front_colour = "black"
        if not front.any():
            continue
        order = np.argsort(t[front], kind="stable")
        ft, fs = t[front][order], s[front][order]
        fkeys = [k for k, f in zip(keys, front) if f]
        fkeys = [fkeys[i] for i in order]
        ax.step(ft, fs, where="post", color=front_colour, linewidth=1.6,
                label=(f"{sources[si][0]}: " if multi else "") + "Pareto front")
        ax.scatter(ft, fs, facecolors="none", edgecolors=front_colour, s=90, linewidths=1.4)
        # Front runs get a number on the plot and their configuration in a list beside
        # it: full labels on the points would overlap. Long fronts: the fastest, the
        # most accurate and evenly spaced runs between them.
        picks = np.unique(np.linspace(0, len(ft) - 1, min(len(ft), 10)).round().astype(int))
        for i in picks:
            n = len(front_entries) + 1
            ax.annotate(str(n), (ft[i], fs[i]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8, fontweight="bold", color=front_colour)
            prefix = f"{sources[si][0]}: " if multi else ""
            front_entries.append((front_colour, f"{n}: {prefix}{text_of[fkeys[i]]}, mIoU "
                                                f"{fmt(fs[i], '.3f')} in {seconds(ft[i])}"))
    times = [v for _, sel in pts for v in sel["train_time_s"]]
    if max(times) / min(times) > 20:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        # Label the 2x and 5x minor ticks too: a log axis with labels only at powers of
        # ten is hard to read off.
        ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v))) in (2, 5)
            else ""))
    ax.set(xlabel="training time (s)", ylabel="validation mIoU (mean IoU over classes)")
    weak_any = any(sel["low_confidence"].any() for _, sel in pts)
    ax.set_title("better: up and to the left; circled runs are not beaten on both "
                 "(numbered, listed right)"
                 + ("; hollow runs are low-confidence, kept off the front" if weak_any
                    else "")
                 + ("" if front_entries else "\nno run qualifies for the front"),
                 fontsize=9, color="0.3")
    grid(ax)
    if weak_any:
        ax.scatter([], [], facecolors="white", edgecolors="0.3", s=30, label=HOLLOW)
    # The runs legend sits inside the axes; the front list beside it is the axes'
    # "official" legend, the one constrained layout makes room for.
    ax.add_artist(ax.legend(loc="best", fontsize=8))
    if front_entries:
        ax.legend([Line2D([], [], linestyle="none") for _ in front_entries],
                  [text for _, text in front_entries], loc="upper left",
                  bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7.5,
                  title="Pareto front", title_fontsize=8, handlelength=0,
                  handletextpad=0, labelcolor=[c for c, _ in front_entries])
    save(fig, path)
    return PlotResult(name, path)


def _scatter(ax, t: np.ndarray, s: np.ndarray, weak: np.ndarray, colour: Any, label: str,
             alpha: float = 0.75) -> None:
    """Runs as dots, low-confidence ones hollow; one legend entry for both."""
    for hollow in (False, True):
        m = weak == hollow
        if m.any():
            ax.scatter(t[m], s[m], s=30, alpha=alpha, linewidths=1.4, edgecolors=colour,
                       facecolors="white" if hollow else colour,
                       label=None if hollow and (~weak).any() else label)


_PLOTTERS: dict[str, Callable[..., PlotResult]] = {
    "speedup": plot_speedup,
    "efficiency": plot_efficiency,
    "throughput_vs_batch": plot_throughput_vs_batch,
    "memory": plot_memory,
    "accuracy_vs_depth": plot_accuracy_vs_depth,
    "pareto": plot_pareto,
}


def _plot_each(data: Sources, out: Path, context: str | None) -> dict[str, PlotResult]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Analysed once here, not once per figure.
    data = analysis.analysed(data) if isinstance(data, pd.DataFrame) else \
        [(label, analysis.analysed(df)) for label, df in data]
    results = {}
    for name in PLOT_NAMES:
        path = out / f"{name}.png"
        try:
            results[name] = _PLOTTERS[name](data, path, context)
        except Exception as e:
            # One broken figure must not cost the others (or the report after them); the
            # figure says what failed so the failure is not silent.
            results[name] = _note_figure(name, path, f"figure failed: {type(e).__name__}: "
                                         f"{e}", context)
    return results


def plot_all(df: pd.DataFrame, out: str | Path, context: str | None = None
             ) -> dict[str, PlotResult]:
    """Every figure of :data:`PLOT_NAMES` as ``out/<name>.png``.

    Every derived number is read from :func:`segcore.results.analysis.frame` of ``df``
    (computed here unless ``df`` is already analysed), so the figures follow the
    definitions whatever the table holds.

    Args:
        df: the results table (rows as in runs.csv; any statuses, gaps allowed), or its
            analysed frame.
        out: the plots folder (usually ``<results folder>/plots``); created if missing.
        context: a line under every title; see :func:`describe_context`.

    Returns:
        ``{name: PlotResult}`` in :data:`PLOT_NAMES` order.
    """
    return _plot_each(df, Path(out), context)


def plot_compare(folders: Sequence[str | Path], out: str | Path,
                 labels: Sequence[str] | None = None) -> dict[str, PlotResult]:
    """The same figures for several results folders, one colour per folder.

    Speedup is computed within each folder (against that folder's 1-worker runs).

    Args:
        folders: results folders (e.g. two machines, or two commits).
        out: the folder to write the PNGs into (created if missing).
        labels: legend name per folder; default :func:`folder_labels`.

    Returns:
        as :func:`plot_all`.
    """
    folders = [Path(f) for f in folders]
    labels = list(labels) if labels is not None else folder_labels(folders)
    data = [(lab, read_rows(f)) for lab, f in zip(labels, folders)]
    cpu = any(is_cpu(df, read_env(f)) for f, (_, df) in zip(folders, data))
    context = f"comparing {len(folders)} results folders" + (
        " · CPU: relative effects, not GPU performance" if cpu else "")
    return _plot_each(data, Path(out), context)
