"""Panel grids of line figures: how lines become panels, colours, line styles and a
legend, and how they are drawn.

A figure is one or more *groups* (:class:`Group`: panels sharing an x axis and a
legend), each showing one or more *metrics* (:class:`Metric`: a column of panels) as
:class:`Line` objects, one per configuration. :func:`encode` chooses which differing
configuration values become panels (outermost first,
:data:`segcore.results.labels.DIM_ORDER`), colours and line styles; :func:`render` draws
and saves. Lines are drawn as the
analysis gave them: a point resting on a low-confidence row is hollow, a bar spans the
repeats and confidence intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

from segcore.io import save_figure_atomic
from segcore.results.labels import default_label, describe_keys, dim_rank

__all__ = ["HOLLOW", "SOURCE", "Line", "Metric", "Group", "Encoding", "encode",
           "palette", "grid", "suptitle", "save", "render"]

HOLLOW = "hollow marker: low confidence (see report)"
SOURCE = "__source__"  # the folder a line comes from, when comparing folders
_MAX_LINES = 9  # lines per panel before the figure is split into panels
_MAX_COMPARE_STYLES = 4  # line styles per panel when colour tells the folders apart
_MAX_PANELS = 12
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DPI = 110


@dataclass
class Line:
    """One family's points: x, the median y, its bar (repeats and CIs), whether any row
    behind a point is low-confidence, and the node count (multi-node runs)."""

    source: int
    key: tuple
    x: np.ndarray
    y: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    weak: np.ndarray
    nodes: np.ndarray


# --------------------------------------------------------------------------- encoding


@dataclass
class Encoding:
    """How lines map to panels, colours and line styles."""

    facets: list[str]
    colour: str | None
    styles: list[str]
    desc: list[dict[str, str]]  # per line: column -> text (incl. SOURCE)
    panels: list[tuple[str, ...]]  # facet values, in drawing order
    colour_of: dict[str, Any]
    style_of: dict[tuple[str, ...], tuple[str, str]]
    default: str | None  # the label of a lone line when nothing varies

    def panel(self, i: int) -> int:
        return self.panels.index(tuple(self.desc[i][c] for c in self.facets))

    def line_style(self, i: int) -> tuple[Any, str, str, float]:
        """Colour, dash, marker and width of line ``i``."""
        d = self.desc[i]
        colour = self.colour_of[d[self.colour]] if self.colour else palette(1)[0]
        style = self.style_of.get(tuple(d[c] for c in self.styles), ("-", "o"))
        # Earlier colours are drawn wider, so a line hidden under an identical one
        # (DDP memory at 1, 2 and 4 workers) still shows as a coloured rim.
        n = len(self.colour_of)
        rank = list(self.colour_of).index(d[self.colour]) if self.colour else 0
        width = 1.4 + (1.1 * (n - 1 - rank) / (n - 1) if n > 1 else 0.0)
        return colour, style[0], style[1], width

    def legend(self) -> tuple[list, list[str]]:
        handles, labels = [], []
        if self.colour is None:
            handles.append(Line2D([], [], color=palette(1)[0], marker="o"))
            labels.append(self.default or "all runs")
        for text, colour in self.colour_of.items():
            # Colour swatches are solid lines without markers when styles carry meaning,
            # so the two halves of the legend read independently.
            handles.append(Line2D([], [], color=colour, linewidth=3 if self.styles else 1.6,
                                  marker=None if self.styles else "o"))
            labels.append(text)
        for values, (ls, marker) in self.style_of.items():
            handles.append(Line2D([], [], color="0.3", linestyle=ls, marker=marker))
            labels.append(", ".join(values))
        return handles, labels


def encode(lines: Sequence[Line], key_cols: Sequence[str],
           sources: list[tuple[str | None, pd.DataFrame]]) -> Encoding:
    """Choose panels, colours and line styles for ``lines`` so that each panel holds at
    most :data:`_MAX_LINES` lines where possible (:data:`_MAX_COMPARE_STYLES` per folder
    when comparing), and every line is identified by its colour (the innermost varying
    dimension, or the folder) and line style (the others)."""
    keys = [ln.key for ln in lines]
    # Every line needs a value for every dimension to be placed in a panel and styled.
    desc = describe_keys(keys, key_cols, skip_missing=False)
    multi = len(sources) > 1
    if multi:
        for d, ln in zip(desc, lines):
            d[SOURCE] = str(sources[ln.source][0])
    shown = [c for c in (desc[0] if desc else {}) if c != SOURCE]
    if multi:
        # What is constant within each folder (its device) is said by the folder's
        # colour; naming it again would also split the folders into separate panels.
        const = {key_cols[i] for i in _folder_constant(lines, key_cols)}
        shown = [c for c in shown if c not in const]
    inner = sorted(shown, key=dim_rank, reverse=True)
    facets: list[str] = []
    budget = _MAX_COMPARE_STYLES if multi else _MAX_LINES

    def per_panel(fs: list[str]) -> tuple[int, int]:
        """(panels, most lines in one panel, not counting folders) with facets ``fs``."""
        rest = [c for c in inner if c not in fs]
        panels: dict[tuple, set] = {}
        for d in desc:
            panels.setdefault(tuple(d[c] for c in fs), set()).add(tuple(d[c] for c in rest))
        return len(panels), max((len(v) for v in panels.values()), default=0)

    for c in sorted(shown, key=dim_rank):  # outermost first
        if per_panel(facets)[1] <= budget:
            break
        if per_panel(facets + [c])[0] <= _MAX_PANELS:
            facets.append(c)
    # A dimension constant within every panel (precision when each engine ran in one
    # precision) belongs in the panel title, not in the line styles.
    for c in [c for c in inner if c not in facets]:
        values: dict[tuple, set] = {}
        for d in desc:
            values.setdefault(tuple(d[f] for f in facets), set()).add(d[c])
        if facets and all(len(v) == 1 for v in values.values()):
            facets.append(c)
    facets.sort(key=dim_rank)
    dims = ([SOURCE] if multi else []) + [c for c in inner if c not in facets]
    colour = dims[0] if dims else None
    styles = sorted(dims[1:], key=dim_rank)  # legend text in reading order: ddp, fp32
    panels = list(dict.fromkeys(tuple(d[c] for c in facets) for d in desc))
    colour_values = list(dict.fromkeys(d[colour] for d in desc)) if colour else []
    style_values = list(dict.fromkeys(tuple(d[c] for c in styles) for d in desc)) \
        if styles else []
    colours = palette(len(colour_values))
    # Marker and dash change together, so that up to 8 style values stay distinct.
    combos = [(_LINESTYLES[i % len(_LINESTYLES)], _MARKERS[i % len(_MARKERS)])
              for i in range(len(style_values))]
    default = default_label(keys[0], key_cols) if keys and not shown and not multi \
        else None
    return Encoding(facets, colour, styles, desc, panels,
                     dict(zip(colour_values, colours)), dict(zip(style_values, combos)),
                     default)


def palette(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def _folder_constant(lines: Sequence[Line], key_cols: Sequence[str]) -> set[int]:
    """Indices of the key columns constant within each folder (its device name)."""
    values: dict[tuple[int, int], set] = {}
    for ln in lines:
        for i, v in enumerate(ln.key):
            values.setdefault((i, ln.source), set()).add(v)
    return {i for i in range(len(key_cols))
            if all(len(v) == 1 for (j, _), v in values.items() if j == i)}


# --------------------------------------------------------------------------- drawing


@dataclass
class Metric:
    """One quantity drawn against the group's x axis (a column of panels)."""

    lines: list[Line]
    ylabel: str
    title: str = ""
    decorate: Callable[[Any, list[Line]], None] | None = None  # ideal lines, limits


@dataclass
class Group:
    """Panels sharing one x axis, one encoding and one legend (a subfigure)."""

    key_cols: list[str]
    xlabel: str
    metrics: list[Metric]
    title: str = ""
    log2_from: float = 16.0
    extra_handles: list = field(default_factory=list)
    annotate_nodes: bool = False
    empty_note: str = "no data"


def grid(ax) -> None:
    ax.grid(True, alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)


def _discrete_axis(ax, values: Iterable[float], log2_from: float = 16) -> None:
    """Ticks at the measured values; a log2 scale when they span a wide range (worker
    counts 1..64, batch sizes 2..256) so that doublings are evenly spaced."""
    vals = sorted({float(v) for v in values if np.isfinite(v) and v > 0})
    if not vals:
        return
    if vals[-1] / vals[0] >= log2_from:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(vals, [f"{v:g}" for v in vals])


def _layout(n_panels: int, n_metrics: int) -> tuple[int, int]:
    if n_metrics > 1:
        return n_panels, n_metrics
    ncols = {1: 1, 2: 2, 3: 3, 4: 2}.get(n_panels, 3)
    return math.ceil(n_panels / ncols), ncols


def _figure_for(groups: list[tuple[Group, Encoding]], title: str,
                context: str | None, notes: Sequence[str] = ()) -> tuple[Figure, list]:
    sizes = [_layout(len(enc.panels) or 1, len(g.metrics)) for g, enc in groups]
    # Groups of several panel columns are stacked, not put side by side: a figure
    # wider than a screen is read in pieces.
    stacked = len(groups) > 1 and any(c > 1 for _, c in sizes)
    widths = [4.3 * c + 2.6 for _, c in sizes]
    heights = [3.3 * r + (0.5 if len(groups) > 1 else 0.0) for r, _ in sizes]
    width = max(widths) if stacked else sum(widths)
    height = (sum(heights) if stacked else max(heights)) + 1.2
    fig = Figure(figsize=(max(width, 7.5), max(height, 4.6)), layout="constrained")
    suptitle(fig, [title, context, *notes])
    if len(groups) == 1:
        return fig, [fig]
    if stacked:
        subs = fig.subfigures(len(groups), 1, height_ratios=heights)
    else:
        subs = fig.subfigures(1, len(groups), width_ratios=widths)
    return fig, list(np.ravel(subs))


def _draw_group(sub, g: Group, enc: Encoding, separate_title: bool) -> None:
    n_panels = len(enc.panels) or 1
    multi_metric = len(g.metrics) > 1
    nrows, ncols = _layout(n_panels, len(g.metrics))
    axes = sub.subplots(nrows, ncols, sharex=True, sharey="col" if multi_metric else True,
                        squeeze=False)
    if separate_title and g.title:
        sub.suptitle(g.title, fontsize=10, fontweight="bold")
    xs = sorted({v for m in g.metrics for ln in m.lines for v in ln.x})
    line_index = {id(ln): i for i, ln in enumerate(_group_lines(g))}
    drawn = []
    for p in range(nrows * ncols):
        r, c = divmod(p, ncols)
        ax = axes[r, c]
        panel, metric = (r, g.metrics[c]) if multi_metric else (p, g.metrics[0])
        if panel >= n_panels:
            ax.remove()  # an empty slot of the grid
            continue
        facet_text = ", ".join(enc.panels[panel]) if enc.panels and enc.panels[panel] \
            else ""
        head = " — ".join(t for t in (metric.title if multi_metric else "", facet_text)
                          if t)
        mine = [ln for ln in metric.lines
                if not enc.facets or enc.panel(line_index[id(ln)]) == panel]
        for ln in mine:
            colour, ls, marker, width = enc.line_style(line_index[id(ln)])
            ax.plot(ln.x, ln.y, linestyle=ls, color=colour, linewidth=width)
            for weak in (False, True):
                m = ln.weak == weak
                if m.any():
                    ax.plot(ln.x[m], ln.y[m], linestyle="none", marker=marker,
                            color=colour, markersize=3.5 + width,
                            markerfacecolor="white" if weak else colour,
                            markeredgewidth=1.4 if weak else 1.0)
            bar = np.isfinite(ln.lo) & np.isfinite(ln.hi) & (ln.hi > ln.lo)
            if bar.any():  # repeats' range and 95 % CIs
                ax.errorbar(ln.x[bar], ln.y[bar], yerr=[ln.y[bar] - ln.lo[bar],
                                                        ln.hi[bar] - ln.y[bar]],
                            fmt="none", ecolor=colour, capsize=3, alpha=0.7, linewidth=1)
            if g.annotate_nodes:
                for x, y, n in zip(ln.x, ln.y, ln.nodes):
                    if np.isfinite(n) and n > 1:
                        ax.annotate(f"{int(n)} nodes", (x, y), textcoords="offset points",
                                    xytext=(4, -10), fontsize=7, color=colour)
        if not mine:
            ax.text(0.5, 0.5, f"not enough data: {g.empty_note}", ha="center",
                    va="center", fontsize=9, color="0.35", transform=ax.transAxes)
        elif len({v for ln in mine for v in ln.x}) < 2:
            head = (head + "\n" if head else "") + "one x value only: not a trend"
        ax.set_title(head, fontsize=9)
        bottom = r == nrows - 1 or (not multi_metric and panel + ncols >= n_panels)
        ax.set_xlabel(g.xlabel if bottom else "")
        if bottom:
            ax.xaxis.set_tick_params(labelbottom=True)  # under a removed grid slot
        ax.set_ylabel(metric.ylabel if c == 0 or multi_metric else "")
        grid(ax)
        drawn.append((ax, metric))
    if xs:
        _discrete_axis(axes[0, 0], xs, g.log2_from)
    # Limits last: on shared axes, a limit set before every panel is drawn would freeze
    # the range of the panels drawn so far and cut the others' lines.
    for ax, metric in drawn:
        if metric.decorate is not None:
            metric.decorate(ax, metric.lines)
    handles, labels = enc.legend()
    extra = list(g.extra_handles)
    if any(ln.weak.any() for ln in _group_lines(g)):
        extra.append(Line2D([], [], color="0.3", marker="o", markerfacecolor="white",
                            linestyle="none", label=HOLLOW))
    for h in extra:
        handles.append(h)
        labels.append(h.get_label())
    # Beside the top-right panel rather than a figure legend: constrained layout keeps
    # an axes legend clear of the figure title, which a figure legend can overlap.
    axes[0, ncols - 1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                              borderaxespad=0.0, fontsize=8)


def _group_lines(g: Group) -> list[Line]:
    return [ln for m in g.metrics for ln in m.lines]


def _keep_common(g: Group, n_sources: int) -> int:
    """Comparing folders: keep only the configurations measured in more than one of
    them (when there are any), since a line without a counterpart compares nothing.

    Returns:
        how many configurations were dropped.
    """
    every = _group_lines(g)
    const = _folder_constant(every, g.key_cols)

    def key(ln: Line) -> tuple:
        return tuple(v for i, v in enumerate(ln.key) if i not in const)

    folders: dict[tuple, set[int]] = {}
    for ln in every:
        folders.setdefault(key(ln), set()).add(ln.source)
    common = {k for k, f in folders.items() if len(f) > 1}
    if n_sources < 2 or not common:
        return 0
    for m in g.metrics:
        m.lines = [ln for ln in m.lines if key(ln) in common]
    return len(folders) - len(common)


def render(path: Path, title: str, context: str | None, groups: list[Group],
            sources, notes: Sequence[str] = ()) -> None:
    encoded = []
    notes = list(notes)
    for g in groups:
        dropped = _keep_common(g, len(sources))
        if dropped:
            notes.append(f"{dropped} configuration(s) measured in one folder only are "
                         "not shown" + (f" ({g.title})" if g.title else ""))
        enc = encode(_group_lines(g), g.key_cols, sources)
        encoded.append((g, enc))
    fig, subs = _figure_for(encoded, title, context, notes)
    for sub, (g, enc) in zip(subs, encoded):
        _draw_group(sub, g, enc, separate_title=len(groups) > 1)
    save(fig, path)


def suptitle(fig: Figure, lines: Sequence[str | None]) -> None:
    """The figure title, its lines wrapped to the figure's width (a long sweep id would
    otherwise run off both edges)."""
    import textwrap

    chars = max(40, int(fig.get_figwidth() * 11))  # ~11 characters per inch at 11 pt
    text = "\n".join(textwrap.fill(line, chars, break_on_hyphens=False)
                     for line in lines if line)
    fig.suptitle(text, fontsize=11)


def save(fig: Figure, path: Path) -> None:
    save_figure_atomic(fig, path, dpi=_DPI)


