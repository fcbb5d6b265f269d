"""Figures of a results table: scaling, throughput, memory, accuracy and its Pareto front.

Every figure is drawn from rows as in ``runs.csv`` (a DataFrame from
:func:`segcore.results.read_rows`). Only rows with ``status == "ok"`` are drawn. Rows are
grouped into *families*: configurations identical in everything but the axis a figure
varies (see :data:`FAMILY_COLUMNS`); one line per family, labelled only with the
columns that differ between the families shown. Repeats of one configuration are drawn
as their median with a min-max bar.

A figure whose data is missing (one worker count, no accuracy, nothing ok) is still
written, as a panel that says ``not enough data: ...``, so that a results folder always
holds the same files and the reader learns why a figure is empty; the returned
:class:`PlotResult` carries the same note for the report.

Figures are drawn on :class:`matplotlib.figure.Figure` objects, never through pyplot,
so no backend or global figure state is touched.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from segcore.host import hardware_tag
from segcore.sweep.rows import read_rows

__all__ = [
    "PLOT_NAMES", "PLOT_TITLES", "FAMILY_COLUMNS", "OPTIONAL_FAMILY_COLUMNS", "PlotResult",
    "compute_speedup", "family_keys", "pareto_front", "plot_speedup", "plot_efficiency",
    "plot_throughput_vs_batch", "plot_memory", "plot_accuracy_vs_depth", "plot_pareto",
    "plot_all", "plot_folder", "plot_compare", "read_env", "folder_labels",
    "describe_context", "describe_rows",
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

# A family is everything that defines a configuration except its scale: world_size and
# nnodes are the scaling axis (a 2-node 8-worker run is compared with the 1-worker run of
# the same configuration), global_batch_size follows from them. Under strong scaling the
# per-worker batch shrinks with the worker count, so the global batch identifies the
# family instead (see _batch_key).
FAMILY_COLUMNS = (
    "engine", "zero_stage", "loader", "precision", "channels_last", "compile", "batch_size",
    "arch", "depth", "widths", "image_size", "class_scheme", "num_classes", "device_type",
    "device_name", "mode", "strong_scaling",
)
# Axes a sweep may vary that not every row records (the paper preset varies lr and
# augmentation); used when the table has them, otherwise two such configurations would
# be merged into one family.
OPTIONAL_FAMILY_COLUMNS = ("lr", "augment", "optimizer", "loss", "class_weights",
                           "grad_accum", "norm")

_NUMERIC = ("world_size", "nnodes", "batch_size", "global_batch_size", "depth",
            "image_size", "throughput_img_s", "step_ms_p50", "step_ms_p99", "data_wait_pct",
            "speedup", "scaling_efficiency", "peak_mem_mb", "train_time_s",
            "time_to_target_s", "mIoU", "mDice", "launch_overhead_s",
            "throughput_spread_pct", "repeat", "target_miou")
# Columns redundant with others in most sweeps (widths follow depth, params follow
# widths and classes): dropped from a label when the labels stay distinct without them.
_REDUNDANT = ("params", "num_classes", "widths", "device_type", "device_name", "mode",
              "strong_scaling")
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DPI = 110

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


# --------------------------------------------------------------------------- values


def _norm(v: Any) -> Any:
    """A hashable, comparable form of one cell: NaN/None/"" -> None, 8.0 -> 8, lists of
    widths -> "16-32-64", numpy scalars -> Python."""
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return None
        return int(f) if f.is_integer() else f
    if isinstance(v, (list, tuple, np.ndarray)):
        return "-".join(str(_norm(x)) for x in v)
    if isinstance(v, str):
        s = v.strip()
        low = s.lower()
        # Booleans read back from a CSV by something other than pandas.
        if low in ("true", "false"):
            return low == "true"
        return s or None
    return str(v)


def _sort_key(v: Any) -> tuple:
    # Mixed types in one column (None next to ints, strings next to numbers) must still
    # sort: numbers first, then strings, then missing.
    if v is None:
        return (2, "")
    if isinstance(v, tuple):
        return (0, tuple(_sort_key(x) for x in v))
    if isinstance(v, (bool, int, float)):
        return (0, float(v))
    return (1, str(v))


def _truthy(v: Any) -> bool:
    n = _norm(v)
    return n is True or (isinstance(n, (int, float)) and not isinstance(n, bool) and n != 0)


def _clean(df: pd.DataFrame | None) -> pd.DataFrame:
    """A copy with every column the figures read present, metrics numeric (bad cells
    NaN), depth filled from widths where missing, and the private columns ``_ok``
    (status == ok) and ``_batch`` (the batch that identifies a family)."""
    d = pd.DataFrame() if df is None else df.copy()
    d = d.reset_index(drop=True)
    for col in _NUMERIC:
        d[col] = pd.to_numeric(d[col], errors="coerce") if col in d else np.nan
        d[col] = d[col].astype(float)
    for col in ("status", "run_id", "error", "peak_mem_source", "noisy", "widths",
                "sweep_id", "device_type", "strong_scaling"):
        if col not in d:
            d[col] = None
    if len(d):
        widths = d["widths"].map(_norm)
        from_widths = widths.map(lambda w: float(len(str(w).split("-")))
                                 if w is not None else np.nan)
        d["depth"] = d["depth"].fillna(from_widths)
    d["_ok"] = d["status"].map(lambda s: _norm(s) == "ok").astype(bool) if len(d) \
        else pd.Series(dtype=bool)
    d["_batch"] = [_batch_key(s, b, g) for s, b, g in
                   zip(d["strong_scaling"], d["batch_size"], d["global_batch_size"])]
    return d


def _batch_key(strong: Any, batch: float, global_batch: float) -> Any:
    if _truthy(strong):
        return ("global", _norm(global_batch))
    return _norm(batch)


def _family_columns(d: pd.DataFrame, columns: Sequence[str] | None = None) -> list[str]:
    cols = list(FAMILY_COLUMNS if columns is None else columns)
    if columns is None:
        cols += [c for c in OPTIONAL_FAMILY_COLUMNS if c in d.columns]
    return cols


def family_keys(df: pd.DataFrame, columns: Sequence[str]) -> list[tuple]:
    """One hashable key per row: the normalized values of ``columns``.

    ``batch_size`` stands for the batch that defines the family: the per-worker batch
    under weak scaling, ``("global", N)`` under strong scaling. Columns missing from
    ``df`` count as ``None``.

    Args:
        df: rows (cleaned or not).
        columns: the columns that make up the key.

    Returns:
        a list of tuples, aligned with ``df``'s rows.
    """
    d = df if "_batch" in df.columns else _clean(df)
    parts = []
    for c in columns:
        if c == "batch_size":
            parts.append(list(d["_batch"]))
        elif c in d.columns:
            parts.append([_norm(v) for v in d[c]])
        else:
            parts.append([None] * len(d))
    return list(zip(*parts)) if parts else [() for _ in range(len(d))]


# --------------------------------------------------------------------------- speedup


def _speedup_columns(d: pd.DataFrame, columns: Sequence[str] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    cols = _family_columns(d, columns)
    keys = family_keys(d, cols)
    tp = d["throughput_img_s"].to_numpy(float)
    ws = d["world_size"].to_numpy(float)
    usable = d["_ok"].to_numpy(bool) & np.isfinite(tp) & (tp > 0)
    base_samples: dict[tuple, list[float]] = {}
    for k, t, w, u in zip(keys, tp, ws, usable):
        if u and w == 1:
            base_samples.setdefault(k, []).append(t)
    # Repeats of the baseline: their median, so one slow repeat does not shift every
    # speedup of the family.
    base = {k: float(np.median(v)) for k, v in base_samples.items()}
    speedup = np.array([t / base[k] if u and k in base else np.nan
                        for k, t, u in zip(keys, tp, usable)], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        eff = np.where(ws > 0, speedup / ws, np.nan)
    return speedup, eff


def compute_speedup(df: pd.DataFrame, family_columns: Sequence[str] | None = None
                    ) -> pd.DataFrame:
    """Fill ``speedup`` and ``scaling_efficiency`` (DESIGN.md section 4).

    ``speedup`` = throughput / throughput of the 1-worker (``world_size == 1``) ok row of
    the same family (all of ``family_columns`` equal); with repeats, the baseline is the
    median throughput of the 1-worker repeats. ``scaling_efficiency`` = speedup /
    world_size. Rows that are not ok, have no throughput, or whose family has no
    1-worker row get NaN. Values already in the table are replaced.

    Args:
        df: rows as in runs.csv.
        family_columns: the columns that define a family; default :data:`FAMILY_COLUMNS`
            plus those of :data:`OPTIONAL_FAMILY_COLUMNS` present in ``df``.

    Returns:
        a copy of ``df`` (same columns, order and index) with both columns filled.
    """
    out = df.copy()
    d = _clean(df)
    speedup, eff = _speedup_columns(d, family_columns)
    out["speedup"] = speedup
    out["scaling_efficiency"] = eff
    return out


def pareto_front(times: Iterable[float], scores: Iterable[float]) -> np.ndarray:
    """Which points are not dominated (no other point is at least as fast and better).

    Args:
        times: cost per point (lower is better), e.g. ``train_time_s``.
        scores: value per point (higher is better), e.g. ``mIoU``.

    Returns:
        a boolean mask; points with a non-finite time or score are never on the front.
    """
    t = np.asarray(list(times), dtype=float)
    s = np.asarray(list(scores), dtype=float)
    mask = np.zeros(len(t), dtype=bool)
    finite = np.flatnonzero(np.isfinite(t) & np.isfinite(s))
    # Fastest first; among equal times the best score first, so its slower-or-equal
    # twins are dominated.
    order = finite[np.lexsort((-s[finite], t[finite]))]
    best = -np.inf
    for i in order:
        if s[i] > best:
            mask[i] = True
            best = s[i]
    return mask


# --------------------------------------------------------------------------- labels

# Outermost first: facets (one panel per value) are taken from the front, colours and
# line styles from the back, so that a panel compares what a reader compares first
# (worker counts, batch sizes, depths) within one engine / precision / dataset.
_DIM_ORDER = (
    "device_name", "device_type", "class_scheme", "num_classes", "mode", "strong_scaling",
    "engine", "loader", "precision", "channels_last", "compile", "arch", "norm",
    "image_size", "lr", "augment", "optimizer", "loss", "class_weights", "grad_accum",
    "params", "widths", "depth", "batch_size", "world_size",
)
_SOURCE = "__source__"  # the folder a line comes from, when comparing folders
_MAX_LINES = 9  # lines per panel before the figure is split into panels
_MAX_COMPARE_STYLES = 4  # line styles per panel when colour tells the folders apart
_MAX_PANELS = 12


def _piece(col: str, v: Any, key: dict[str, Any]) -> str:
    """Compact text of one configuration value, for legends and panel titles."""
    if v is None:
        return f"{col} ?"
    if col == "engine":
        z = key.get("zero_stage")
        return f"deepspeed ZeRO-{z}" if v == "deepspeed" and z is not None else str(v)
    if col == "zero_stage":
        return f"ZeRO-{v}"
    if col == "batch_size":
        return f"global batch {v[1]}" if isinstance(v, tuple) else f"batch {v}"
    if col == "world_size":
        return f"{v} worker" + ("s" if v != 1 else "")
    if col == "nnodes":
        return f"{v} node" + ("s" if v != 1 else "")
    if col == "channels_last":
        return "channels-last" if v else "NCHW"
    if col == "compile":
        return "compiled" if v else "eager"
    if col == "strong_scaling":
        return "strong scaling" if v else "weak scaling"
    if col == "augment":
        return "augmented" if v else "no augmentation"
    fmt = {"depth": "depth {}", "widths": "widths {}", "image_size": "{}px crops",
           "class_scheme": "{} classes", "num_classes": "{} classes", "mode": "{} mode",
           "loader": "{} loader", "arch": "{} U-Net", "lr": "lr {}", "params": "{} params",
           "precision": "{}", "device_name": "{}", "device_type": "{}"}
    return fmt.get(col, col + " {}").format(v)


def _shown_columns(keys: Sequence[tuple], cols: Sequence[str]) -> list[str]:
    """The key columns worth naming: those that vary across ``keys`` (missing values
    ignored), minus the redundant ones, with the ZeRO stage folded into the engine."""
    uniq = list(dict.fromkeys(keys))
    idx = {c: i for i, c in enumerate(cols)}
    varying = [c for c in cols if len({k[idx[c]] for k in uniq} - {None}) > 1]

    def distinct(columns: list[str]) -> int:
        return len({tuple(k[idx[c]] for c in columns) for k in uniq})

    for c in _REDUNDANT:
        if c in varying and distinct([x for x in varying if x != c]) == distinct(varying):
            varying.remove(c)
    if "zero_stage" in varying:
        varying.remove("zero_stage")
        if "engine" in idx and "engine" not in varying:
            varying.append("engine")  # the engine piece carries the ZeRO stage
    return [c for c in cols if c in varying]


def _describe(keys: Sequence[tuple], cols: Sequence[str], always: Sequence[str] = (),
              skip_missing: bool = True) -> list[dict[str, str]]:
    """Per key, ``{column: text}`` for the columns that vary (plus ``always``); with
    ``skip_missing`` False every shown column is present ("precision ?")."""
    shown = set(_shown_columns(keys, cols)) | {c for c in always if c in cols}
    shown = [c for c in cols if c in shown]
    out = []
    for k in keys:
        kd = dict(zip(cols, k))
        # A value the row does not record (a failed run's precision) is left out
        # rather than printed as a question mark.
        out.append({c: _piece(c, kd[c], kd) for c in shown
                    if kd[c] is not None or not skip_missing})
    return out


def describe_rows(df: pd.DataFrame, columns: Sequence[str] | None = None,
                  always: Sequence[str] = ()) -> list[str]:
    """A compact description of each row's configuration, naming only what differs
    between the rows (e.g. ``"deepspeed ZeRO-2, bf16, batch 16, 4 workers"``).

    Args:
        df: rows as in runs.csv.
        columns: the columns to describe; default the family columns and world_size.
        always: columns named even when they do not vary.

    Returns:
        one string per row ("" when nothing varies and ``always`` is empty).
    """
    d = _clean(df)
    cols = list(columns) if columns is not None else _family_columns(d) + ["world_size"]
    return [", ".join(x.values()) for x in _describe(family_keys(d, cols), cols, always)]


def _default_label(key: tuple, cols: Sequence[str]) -> str:
    """What a lone line is, when nothing varies to tell it from others."""
    kd = dict(zip(cols, key))
    parts = [_piece(c, kd[c], kd) for c in ("engine", "precision", "batch_size", "depth",
                                            "world_size")
             if c in kd and kd[c] is not None]
    return ", ".join(parts) or "all runs"


def _dim_rank(col: str) -> int:
    # Unknown (user-given) columns sit between the engine-like and the size-like ones.
    return _DIM_ORDER.index(col) if col in _DIM_ORDER else _DIM_ORDER.index("image_size")


# --------------------------------------------------------------------------- encoding


@dataclass
class _Line:
    source: int
    key: tuple
    x: np.ndarray
    y: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    nodes: np.ndarray


@dataclass
class _Encoding:
    """How lines map to panels, colours and line styles."""

    facets: list[str]
    colour: str | None
    styles: list[str]
    desc: list[dict[str, str]]  # per line: column -> text (incl. _SOURCE)
    panels: list[tuple[str, ...]]  # facet values, in drawing order
    colour_of: dict[str, Any]
    style_of: dict[tuple[str, ...], tuple[str, str]]
    default: str | None  # the label of a lone line when nothing varies

    def panel(self, i: int) -> int:
        return self.panels.index(tuple(self.desc[i][c] for c in self.facets))

    def line_style(self, i: int) -> tuple[Any, str, str, float]:
        """Colour, dash, marker and width of line ``i``."""
        d = self.desc[i]
        colour = self.colour_of[d[self.colour]] if self.colour else _palette(1)[0]
        style = self.style_of.get(tuple(d[c] for c in self.styles), ("-", "o"))
        # Earlier colours are drawn wider, so a line hidden under an identical one
        # (DDP memory at 1, 2 and 4 workers) still shows as a coloured rim.
        n = len(self.colour_of)
        rank = list(self.colour_of).index(d[self.colour]) if self.colour else 0
        width = 1.4 + (1.1 * (n - 1 - rank) / (n - 1) if n > 1 else 0.0)
        return colour, style[0], style[1], width

    def legend(self) -> tuple[list, list[str]]:
        from matplotlib.lines import Line2D

        handles, labels = [], []
        if self.colour is None:
            handles.append(Line2D([], [], color=_palette(1)[0], marker="o"))
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


def _encode(lines: list[_Line], key_cols: Sequence[str],
            sources: list[tuple[str | None, pd.DataFrame]]) -> _Encoding:
    """Choose panels, colours and line styles for ``lines`` so that each panel holds at
    most :data:`_MAX_LINES` lines where possible (:data:`_MAX_COMPARE_STYLES` per folder
    when comparing), and every line is identified by its colour (the innermost varying
    dimension, or the folder) and line style (the others)."""
    keys = [ln.key for ln in lines]
    # Every line needs a value for every dimension to be placed in a panel and styled.
    desc = _describe(keys, key_cols, skip_missing=False)
    multi = len(sources) > 1
    if multi:
        for d, ln in zip(desc, lines):
            d[_SOURCE] = str(sources[ln.source][0])
    shown = [c for c in (desc[0] if desc else {}) if c != _SOURCE]
    if multi:
        # What is constant within each folder (its device) is said by the folder's
        # colour; naming it again would also split the folders into separate panels.
        const = {key_cols[i] for i in _folder_constant(lines, key_cols)}
        shown = [c for c in shown if c not in const]
    inner = sorted(shown, key=_dim_rank, reverse=True)
    facets: list[str] = []
    budget = _MAX_COMPARE_STYLES if multi else _MAX_LINES

    def per_panel(fs: list[str]) -> tuple[int, int]:
        """(panels, most lines in one panel, not counting folders) with facets ``fs``."""
        rest = [c for c in inner if c not in fs]
        panels: dict[tuple, set] = {}
        for d in desc:
            panels.setdefault(tuple(d[c] for c in fs), set()).add(tuple(d[c] for c in rest))
        return len(panels), max((len(v) for v in panels.values()), default=0)

    for c in sorted(shown, key=_dim_rank):  # outermost first
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
    facets.sort(key=_dim_rank)
    dims = ([_SOURCE] if multi else []) + [c for c in inner if c not in facets]
    colour = dims[0] if dims else None
    styles = sorted(dims[1:], key=_dim_rank)  # legend text in reading order: ddp, fp32
    panels = list(dict.fromkeys(tuple(d[c] for c in facets) for d in desc))
    colour_values = list(dict.fromkeys(d[colour] for d in desc)) if colour else []
    style_values = list(dict.fromkeys(tuple(d[c] for c in styles) for d in desc)) \
        if styles else []
    palette = _palette(len(colour_values))
    # Marker and dash change together, so that up to 8 style values stay distinct.
    combos = [(_LINESTYLES[i % len(_LINESTYLES)], _MARKERS[i % len(_MARKERS)])
              for i in range(len(style_values))]
    default = _default_label(keys[0], key_cols) if keys and not shown and not multi \
        else None
    return _Encoding(facets, colour, styles, desc, panels,
                     dict(zip(colour_values, palette)), dict(zip(style_values, combos)),
                     default)


def _palette(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


# --------------------------------------------------------------------------- collecting


def _sources(data: Sources) -> list[tuple[str | None, pd.DataFrame]]:
    if isinstance(data, pd.DataFrame):
        return [(None, _prepared(data))]
    return [(label, _prepared(df)) for label, df in data]


def _prepared(df: pd.DataFrame) -> pd.DataFrame:
    d = _clean(df)
    if len(d):
        d["speedup"], d["scaling_efficiency"] = _speedup_columns(d)
    return d


def _collect(sources: list[tuple[str | None, pd.DataFrame]], x: str, y: str,
             key_cols: Sequence[str], scale: float = 1.0) -> list[_Line]:
    """Median ``y`` per ``x`` (with min and max over repeats), one line per source and
    key; ok rows with finite x and y only."""
    lines = []
    for si, (_, d) in enumerate(sources):
        if not len(d):
            continue
        sel = d[d["_ok"] & np.isfinite(d[x]) & np.isfinite(d[y])]
        if not len(sel):
            continue
        groups: dict[tuple, list[int]] = {}
        for pos, k in enumerate(family_keys(sel, key_cols)):
            groups.setdefault(k, []).append(pos)
        for k, pos in groups.items():
            g = sel.iloc[pos]
            agg = g.groupby(x)[y].agg(["median", "min", "max"]).sort_index()
            nodes = g.groupby(x)["nnodes"].max().reindex(agg.index)
            lines.append(_Line(si, k, agg.index.to_numpy(float),
                               agg["median"].to_numpy(float) * scale,
                               agg["min"].to_numpy(float) * scale,
                               agg["max"].to_numpy(float) * scale,
                               nodes.to_numpy(float)))
    lines.sort(key=lambda ln: (ln.source, _sort_key(ln.key)))
    return lines


def _key_cols(cols: Sequence[str], exclude: Sequence[str], with_world: bool) -> list[str]:
    out = [c for c in cols if c not in exclude]
    if with_world and "world_size" not in exclude:
        out.append("world_size")
    return out


def _all_family_cols(sources: list[tuple[str | None, pd.DataFrame]]) -> list[str]:
    cols = list(FAMILY_COLUMNS)
    for c in OPTIONAL_FAMILY_COLUMNS:
        if any(c in d.columns for _, d in sources):
            cols.append(c)
    return cols


# --------------------------------------------------------------------------- drawing


@dataclass
class _Metric:
    """One quantity drawn against the group's x axis (a column of panels)."""

    lines: list[_Line]
    ylabel: str
    title: str = ""
    decorate: Callable[[Any, list[_Line]], None] | None = None  # ideal lines, limits


@dataclass
class _Group:
    """Panels sharing one x axis, one encoding and one legend (a subfigure)."""

    key_cols: list[str]
    xlabel: str
    metrics: list[_Metric]
    title: str = ""
    log2_from: float = 16.0
    extra_handles: list = field(default_factory=list)
    annotate_nodes: bool = False
    empty_note: str = "no data"


def _grid(ax) -> None:
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


def _figure_for(groups: list[tuple[_Group, _Encoding]], title: str,
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
    _suptitle(fig, [title, context, *notes])
    if len(groups) == 1:
        return fig, [fig]
    if stacked:
        subs = fig.subfigures(len(groups), 1, height_ratios=heights)
    else:
        subs = fig.subfigures(1, len(groups), width_ratios=widths)
    return fig, list(np.ravel(subs))


def _draw_group(sub, g: _Group, enc: _Encoding, separate_title: bool) -> None:
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
            ax.plot(ln.x, ln.y, linestyle=ls, marker=marker, color=colour,
                    markersize=3.5 + width, linewidth=width)
            if np.any(ln.hi > ln.lo):  # repeats: their min-max range
                ax.errorbar(ln.x, ln.y, yerr=[ln.y - ln.lo, ln.hi - ln.y], fmt="none",
                            ecolor=colour, capsize=3, alpha=0.7, linewidth=1)
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
        _grid(ax)
        drawn.append((ax, metric))
    if xs:
        _discrete_axis(axes[0, 0], xs, g.log2_from)
    # Limits last: on shared axes, a limit set before every panel is drawn would freeze
    # the range of the panels drawn so far and cut the others' lines.
    for ax, metric in drawn:
        if metric.decorate is not None:
            metric.decorate(ax, metric.lines)
    handles, labels = enc.legend()
    for h in g.extra_handles:
        handles.append(h)
        labels.append(h.get_label())
    # Beside the top-right panel rather than a figure legend: constrained layout keeps
    # an axes legend clear of the figure title, which a figure legend can overlap.
    axes[0, ncols - 1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                              borderaxespad=0.0, fontsize=8)


def _group_lines(g: _Group) -> list[_Line]:
    return [ln for m in g.metrics for ln in m.lines]


def _folder_constant(lines: list[_Line], key_cols: Sequence[str]) -> set[int]:
    """Indices of the key columns constant within each folder (its device name)."""
    values: dict[tuple[int, int], set] = {}
    for ln in lines:
        for i, v in enumerate(ln.key):
            values.setdefault((i, ln.source), set()).add(v)
    return {i for i in range(len(key_cols))
            if all(len(v) == 1 for (j, _), v in values.items() if j == i)}


def _keep_common(g: _Group, n_sources: int) -> int:
    """Comparing folders: keep only the configurations measured in more than one of
    them (when there are any), since a line without a counterpart compares nothing.

    Returns:
        how many configurations were dropped.
    """
    every = _group_lines(g)
    const = _folder_constant(every, g.key_cols)

    def key(ln: _Line) -> tuple:
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


def _render(path: Path, title: str, context: str | None, groups: list[_Group],
            sources, notes: Sequence[str] = ()) -> None:
    encoded = []
    notes = list(notes)
    for g in groups:
        dropped = _keep_common(g, len(sources))
        if dropped:
            notes.append(f"{dropped} configuration(s) measured in one folder only are "
                         "not shown" + (f" ({g.title})" if g.title else ""))
        enc = _encode(_group_lines(g), g.key_cols, sources)
        encoded.append((g, enc))
    fig, subs = _figure_for(encoded, title, context, notes)
    for sub, (g, enc) in zip(subs, encoded):
        _draw_group(sub, g, enc, separate_title=len(groups) > 1)
    _save(fig, path)


def _suptitle(fig: Figure, lines: Sequence[str | None]) -> None:
    """The figure title, its lines wrapped to the figure's width (a long sweep id would
    otherwise run off both edges)."""
    import textwrap

    chars = max(40, int(fig.get_figwidth() * 11))  # ~11 characters per inch at 11 pt
    text = "\n".join(textwrap.fill(line, chars, break_on_hyphens=False)
                     for line in lines if line)
    fig.suptitle(text, fontsize=11)


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)


def _note_figure(name: str, path: Path, note: str, context: str | None) -> PlotResult:
    fig = Figure(figsize=(7.5, 3.0), layout="constrained")
    _suptitle(fig, [PLOT_TITLES[name], context])
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, f"not enough data: {note}", ha="center", va="center", wrap=True,
            fontsize=10, color="0.3", transform=ax.transAxes)
    _save(fig, path)
    return PlotResult(name, path, note)


def _no_ok_note(sources) -> str | None:
    """The note for a table without any ok row, naming the statuses found."""
    if sum(int(d["_ok"].sum()) for _, d in sources if len(d)):
        return None
    statuses: dict[str, int] = {}
    for _, d in sources:
        for s in d["status"] if len(d) else []:
            s = _norm(s) or "unknown"
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
        sel = d[d["_ok"] & np.isfinite(d[col])]
        if require is not None:
            sel = sel[np.isfinite(sel[require])]
        out.extend(sel[col].tolist())
    return sorted(set(out))


def _fmt_list(vals: Iterable[float]) -> str:
    return ", ".join(f"{v:g}" for v in vals)


def _ideal_handle(label: str):
    from matplotlib.lines import Line2D

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
    lines = _collect(sources, "world_size", y, cols, scale=100.0 if efficiency else 1.0)
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

    def decorate(ax, ls: list[_Line]) -> None:
        if efficiency:
            ax.axhline(100.0, color="0.25", linestyle="--", linewidth=1.2, zorder=1)
            top = max(110.0, max(float(np.nanmax(ln.hi)) for ln in ls) * 1.08)
            ax.set_ylim(0, top)
        else:
            ax.plot([1, top_x], [1, top_x], color="0.25", linestyle="--", linewidth=1.2,
                    zorder=1)
            ax.set_ylim(0, max(top_x, max(float(np.nanmax(ln.hi)) for ln in ls)) * 1.08)

    metric = _Metric(shown, "scaling efficiency (%; speedup / workers)" if efficiency
                     else "speedup over 1 worker (× throughput)", decorate=decorate)
    group = _Group(cols, "workers (world size)", [metric], annotate_nodes=True,
                   extra_handles=[_ideal_handle("ideal (100 %)" if efficiency
                                                else "ideal (speedup = workers)")])
    hidden = len(lines) - len(shown)
    notes = [f"{hidden} configuration(s) measured at one worker count only are not shown"] \
        if hidden else []
    _render(path, PLOT_TITLES[name] + _scaling_kind(sources), context, [group], sources,
            notes)
    return PlotResult(name, path)


def _scaling_kind(sources) -> str:
    kinds = set()
    for _, d in sources:
        if len(d):
            kinds |= {_truthy(v) for v in d.loc[d["_ok"], "strong_scaling"]}
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
    lines = _collect(sources, "batch_size", "throughput_img_s", cols)
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

    def decorate(ax, ls: list[_Line]) -> None:
        if log_y:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)

    group = _Group(cols, "batch size per worker (images)",
                   [_Metric(lines, "throughput (images/s, all workers)"
                            + (", log scale" if log_y else ""), decorate=decorate)],
                   log2_from=4)
    _render(path, PLOT_TITLES[name], context, [group], sources)
    return PlotResult(name, path)


_MEM_SOURCES = {
    "allocator": "allocator peak",
    "host_peak_rss": "host peak RSS of the process, CPU run",
}


def _memory_source_text(sources) -> str:
    found = set()
    for _, d in sources:
        if not len(d):
            continue
        sel = d[d["_ok"] & np.isfinite(d["peak_mem_mb"])]
        found |= {_norm(v) for v in sel["peak_mem_source"]}
    found.discard(None)
    if not found:
        return "source not recorded"
    return " / ".join(_MEM_SOURCES.get(s, str(s)) for s in sorted(found))


def plot_memory(data: Sources, path: str | Path, context: str | None = None) -> PlotResult:
    """Peak memory per worker (MB, max over ranks) vs batch size (left) and depth
    (right); the title names the measurement (allocator peak, or on CPU the host peak
    RSS, which includes the process's baseline).

    Args and Returns: as :func:`plot_speedup`.
    """
    name = "memory"
    path = Path(path)
    sources = _sources(data)
    note = _no_ok_note(sources)
    fam = _all_family_cols(sources)
    by_batch = _key_cols(fam, ("batch_size",), with_world=True)
    by_depth = _key_cols(fam, ("depth", "widths", "params"), with_world=True)
    lines_b = _collect(sources, "batch_size", "peak_mem_mb", by_batch)
    lines_d = _collect(sources, "depth", "peak_mem_mb", by_depth)
    if note is None and not lines_b and not lines_d:
        note = "no ok run recorded peak_mem_mb"
    if note is not None:
        return _note_figure(name, path, note, context)

    def decorate(ax, ls: list[_Line]) -> None:
        ax.set_ylim(bottom=0)

    ylabel = "peak memory per worker (MB)"
    groups = [
        _Group(by_batch, "batch size per worker (images)",
               [_Metric(lines_b, ylabel, decorate=decorate)], title="vs batch size",
               log2_from=4, empty_note="no batch size recorded"),
        _Group(by_depth, "U-Net depth (levels)", [_Metric(lines_d, ylabel,
                                                          decorate=decorate)],
               title="vs depth", log2_from=math.inf, empty_note="no depth recorded"),
    ]
    _render(path, f"{PLOT_TITLES[name]} ({_memory_source_text(sources)})", context,
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
    cols = _key_cols(_all_family_cols(sources), ("depth", "widths", "params"),
                     with_world=True)
    miou = _collect(sources, "depth", "mIoU", cols)
    dice = _collect(sources, "depth", "mDice", cols)
    if note is None and not miou:
        note = "no ok run measured accuracy (mIoU); run the sweep with --mode accuracy|both"
    if note is not None:
        return _note_figure(name, path, note, context)
    every = miou + dice
    lo = min(float(np.nanmin(ln.lo)) for ln in every)
    hi = max(float(np.nanmax(ln.hi)) for ln in every)
    pad = max(0.02, 0.08 * (hi - lo))

    def decorate(ax, ls: list[_Line]) -> None:
        # Zoomed to the data (clamped to [0, 1]): differences of a few points matter.
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))

    metrics = [_Metric(miou, "validation mIoU (mean IoU over classes)", "mIoU", decorate)]
    if dice:
        metrics.append(_Metric(dice, "validation mDice (mean Dice = F1 over classes)",
                               "mDice", decorate))
    group = _Group(cols, "U-Net depth (levels)", metrics, log2_from=math.inf,
                   empty_note="no accuracy in this panel")
    _render(path, PLOT_TITLES[name], context, [group], sources)
    return PlotResult(name, path)


def plot_pareto(data: Sources, path: str | Path, context: str | None = None) -> PlotResult:
    """mIoU vs training time, one point per ok run with accuracy, coloured by worker
    count (by folder when comparing); the Pareto front (no other run is both faster and
    more accurate) drawn as a step line, its runs labelled.

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
            sel = d[d["_ok"] & np.isfinite(d["train_time_s"]) & np.isfinite(d["mIoU"])
                    & (d["train_time_s"] > 0)]
            if len(sel):
                pts.append((si, sel))
    if note is None and not pts:
        note = "no ok run recorded both mIoU and train_time_s"
    if note is not None:
        return _note_figure(name, path, note, context)
    fig = Figure(figsize=(11.5, 6.0), layout="constrained")
    _suptitle(fig, [PLOT_TITLES[name], context])
    ax = fig.subplots()
    multi = len(sources) > 1
    if multi:
        # The folder label already names what is constant within each folder (device).
        cols = [c for c in cols if c == "world_size" or any(
            len({_norm(v) for v in sel[c]} - {None}) > 1 for _, sel in pts if c in sel)]
    all_keys = [k for _, sel in pts for k in family_keys(sel, cols)]
    descs = _describe(all_keys, cols, always=("world_size",))
    text_of = {k: ", ".join(d.values()) for k, d in zip(all_keys, descs)}
    ws_all = sorted({w for _, sel in pts for w in sel["world_size"] if np.isfinite(w)})
    ws_colour = dict(zip(ws_all, _palette(len(ws_all))))
    src_colour = _palette(len(sources))
    front_entries: list[tuple[Any, str]] = []
    for si, sel in pts:
        t = sel["train_time_s"].to_numpy(float)
        s = sel["mIoU"].to_numpy(float)
        w = sel["world_size"].to_numpy(float)
        front = pareto_front(t, s)
        keys = family_keys(sel, cols)
        if multi:
            ax.scatter(t, s, color=src_colour[si], alpha=0.45, s=28,
                       label=f"{sources[si][0]}: runs")
            front_colour = src_colour[si]
        else:
            for wv in ws_all:
                m = w == wv
                if m.any():
                    ax.scatter(t[m], s[m], color=ws_colour[wv], alpha=0.75, s=30,
                               label=_piece("world_size", _norm(wv), {}))
            if (~np.isfinite(w)).any():
                ax.scatter(t[~np.isfinite(w)], s[~np.isfinite(w)], color="0.5", s=30,
                           label="workers ?")
            front_colour = "black"
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
            front_entries.append((front_colour, f"{n}: {prefix}{text_of[fkeys[i]]}, "
                                                f"mIoU {fs[i]:.3f} in {_seconds(ft[i])}"))
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
    ax.set_title("better: up and to the left; circled runs are not beaten on both "
                 "(numbered, listed right)", fontsize=9, color="0.3")
    _grid(ax)
    from matplotlib.lines import Line2D

    # The runs legend sits inside the axes; the front list beside it is the axes'
    # "official" legend, the one constrained layout makes room for.
    ax.add_artist(ax.legend(loc="best", fontsize=8))
    ax.legend([Line2D([], [], linestyle="none") for _ in front_entries],
              [text for _, text in front_entries], loc="upper left",
              bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7.5,
              title="Pareto front", title_fontsize=8, handlelength=0, handletextpad=0,
              labelcolor=[c for c, _ in front_entries])
    _save(fig, path)
    return PlotResult(name, path)


# --------------------------------------------------------------------------- environment


def read_env(folder: str | Path) -> dict[str, Any]:
    """``folder/env.json`` as a dict; empty when missing or unreadable."""
    try:
        env = json.loads((Path(folder) / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return env if isinstance(env, dict) else {}


def _is_cpu(env: dict[str, Any], d: pd.DataFrame | None) -> bool:
    if env.get("accelerator") == "cpu":
        return True
    if d is not None and "device_type" in d:
        return any(_norm(v) == "cpu" for v in d["device_type"])
    return False


def describe_context(df: pd.DataFrame | None, env: dict[str, Any]) -> str:
    """One line naming the sweep and hardware, drawn under every figure title.

    Args:
        df: the rows (for the sweep id and device type); may be None.
        env: env.json contents; may be empty.

    Returns:
        e.g. ``"sweep s1 · cpu-2c-intel-xeon · CPU: relative effects, not GPU
        performance"``.
    """
    parts = []
    ids = []
    if df is not None and "sweep_id" in df:
        ids = sorted({str(v) for v in (_norm(x) for x in df["sweep_id"]) if v is not None})
    if not ids and env.get("sweep_id"):
        ids = [str(env["sweep_id"])]
    if ids:
        parts.append("sweep " + ", ".join(ids[:2]) + (" ..." if len(ids) > 2 else ""))
    tag = hardware_tag(env) if env else None
    if tag and not any(i.startswith(tag) for i in ids):  # default ids start with the tag
        parts.append(tag)
    if _is_cpu(env, df):
        parts.append("CPU: relative effects, not GPU performance")
    return " · ".join(parts)


def folder_labels(folders: Sequence[str | Path]) -> list[str]:
    """Distinct short names for results folders, for a comparison legend.

    Each label is the hardware tag of the folder's env.json, then its git commit (7
    characters) when tags collide, then the folder name when those collide too.

    Args:
        folders: results folders.

    Returns:
        one label per folder, in order.
    """
    infos = []
    for f in folders:
        env = read_env(f)
        tag = hardware_tag(env) if env else None
        commit = (env.get("git_commit") or "")[:7] or None
        if commit and env.get("git_dirty"):
            commit += "+dirty"
        infos.append((tag, commit, Path(f).resolve().name or str(f)))

    def build(level: int) -> list[str]:
        out = []
        for tag, commit, name in infos:
            parts = [p for p in (tag, commit if level >= 1 else None,
                                 name if level >= 2 or tag is None else None) if p]
            out.append(" @ ".join(parts[:2]) + (f" ({parts[2]})" if len(parts) > 2 else ""))
        return out

    for level in range(3):
        labels = build(level)
        if len(set(labels)) == len(labels):
            return labels
    # Same folder name twice (e.g. two checkouts' results/latest): number them.
    return [f"{lab} #{i + 1}" for i, lab in enumerate(build(2))]




def _seconds(t: float) -> str:
    return f"{t:.0f} s" if t >= 100 else f"{t:.3g} s"


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

    Speedup and efficiency are recomputed with :func:`compute_speedup`, so the figures
    follow the definition whatever the table holds.

    Args:
        df: the results table (rows as in runs.csv; any statuses, gaps allowed).
        out: the plots folder (usually ``<results folder>/plots``); created if missing.
        context: a line under every title; see :func:`describe_context`.

    Returns:
        ``{name: PlotResult}`` in :data:`PLOT_NAMES` order.
    """
    return _plot_each(df, Path(out), context)


def plot_folder(folder: str | Path, out: str | Path | None = None
                ) -> dict[str, PlotResult]:
    """Redraw a results folder's figures from its runs.jsonl and env.json.

    Args:
        folder: the results folder.
        out: the plots folder; default ``folder/plots``.

    Returns:
        as :func:`plot_all`.
    """
    folder = Path(folder)
    df = read_rows(folder)
    context = describe_context(df, read_env(folder))
    return plot_all(df, Path(out) if out is not None else folder / "plots", context)


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
    cpu = any(_is_cpu(read_env(f), df) for f, (_, df) in zip(folders, data))
    context = f"comparing {len(folders)} results folders" + (
        " · CPU: relative effects, not GPU performance" if cpu else "")
    return _plot_each(data, Path(out), context)
