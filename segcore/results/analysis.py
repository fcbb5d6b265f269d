"""Analysis of a results table: derived columns and judgements, computed once.

Every reader of a results folder (the sweep's last step, the figures, ``report.md``,
``launch/plot.py``) reads the numbers defined here and nowhere else:

- :func:`frame` turns rows as in ``runs.csv`` into the *analysed frame*: clean types,
  family keys, speedup, efficiency, the hardware ceiling, confidence intervals, the
  spread over repeats, quality-aware speedup, the memory figure to show, the
  low-confidence flags and the Pareto front (columns in :data:`DERIVED_COLUMNS`).
- :func:`annotate` does the same for the sweep driver and returns rows with the
  persistent columns (:data:`ANNOTATION_COLUMNS`) filled, to be written back.
- :func:`configurations`, :func:`best_per_objective` and :func:`pareto_front` are the
  judgements the report prints (its caveats: :mod:`segcore.results.caveats`).

Definitions
-----------
*Family*: the configuration without its scale (worker count, node count) and repeat
index (:data:`FAMILY_COLUMNS`, plus those of :data:`OPTIONAL_FAMILY_COLUMNS` the table
has). Under strong scaling the per-worker batch shrinks with the worker count, so the
global batch identifies the family; under an lr scaling rule the lr grows with the
worker count, so the base lr does.

``speedup`` = throughput / throughput of the family's 1-worker ok run (the median of its
repeats). ``scaling_efficiency`` = speedup / world_size. ``hw_ceiling_speedup`` =
min(world_size, ``hw_parallel_limit``): the most speedup the hardware allows (2 on a
2-core host whatever the worker count); NaN where the row does not record the limit.
``time_to_target_speedup`` = the family's 1-worker ``time_to_target_s`` / this row's:
MLPerf's quality-aware speedup (time to the same accuracy, not to the same step count).

A figure we cannot stand behind is ``low_confidence``; ``flags`` names every reason that
applies (:data:`FLAGS`, in that order, comma-separated). Only ok rows are flagged:

- ``few-steps``: ``measured_steps`` < :data:`MIN_MEASURED_STEPS`.
- ``wide-ci``: the 95 % CI half-width of the throughput is more than
  :data:`CI_LIMIT_PCT` % of it (``throughput_ci95_pct``, or derived from
  ``throughput_ci95_lo/hi``), or the repeats of the configuration spread by more than
  :data:`CI_LIMIT_PCT` % of their median ((max - min) / median).
- ``oversubscribed``: the row says so (more workers x threads than cores, more workers
  than GPUs).
- ``emulated-precision``: the row's precision is emulated by the hardware.
- ``impossible-mfu``: an MFU (``mfu`` or ``mfu_gemm``) above 1: its ceiling was not
  measured under the step's conditions, so it is a flag, not a value. It concerns the
  MFU alone (:data:`VALUE_FLAGS`): the row is not low-confidence for it.
- ``wall-gap``: the measured steps cover less than :data:`WALL_SHARE_MIN` of the wall
  time of their window (``measured_time_share``): epoch boundaries, loader restarts or
  checkpoint writes between them cost more than the steps say.
- ``not-converged``: a run that trained for accuracy (``mode`` accuracy or both; rows
  without a mode: those that recorded ``mIoU`` or ``val_loss``) has no finite mIoU, or
  its training loss did not fall (``train_loss_last`` >= ``train_loss_first``), or its
  mIoU is at most 1 / ``num_classes``: the best mIoU a constant prediction (every pixel
  the majority class, IoU = that class's pixel share, 0 elsewhere) can reach.

A CPU host is a condition of the whole folder, not a flag: :mod:`segcore.results.caveats` says it.
Flagged rows are never picked as best (:func:`best_per_objective`) and never on the
Pareto front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from segcore.results import schema
from segcore.scaling.model import RUN_TO_RUN_PCT as _RUN_TO_RUN_PCT

__all__ = [
    "MIN_MEASURED_STEPS", "CI_LIMIT_PCT", "FLAGS", "FAMILY_COLUMNS",
    "OPTIONAL_FAMILY_COLUMNS", "NUMERIC_COLUMNS", "ANNOTATION_COLUMNS", "DERIVED_COLUMNS",
    "Best", "analysed", "norm", "truthy", "sort_key", "family_columns", "family_keys",
    "frame",
    "annotate", "configurations", "best_per_objective", "pareto_front", "numeric_column",
]

MIN_MEASURED_STEPS = 30
# Objectives judged on the measurement alone (convergence does not change them).
SPEED_OBJECTIVES = ("throughput_img_s", "scaling_efficiency", "memory_mb")
CI_LIMIT_PCT = 10.0
WALL_SHARE_MIN = 0.8  # measured step time / wall time of the window, below it: flagged
# Without repeats the run-to-run spread of a configuration is unknown; this much is
# assumed (declared with the scaling model, whose intervals use it too), and the report
# says it was assumed.
RUN_TO_RUN_PCT = _RUN_TO_RUN_PCT
# A host process's peak RSS (CPU runs) moves with the allocator's and the libraries'
# timing: identical configurations in the committed CPU folders measured up to 65 % apart.
# Without repeats a lead in host memory must exceed this to be named.
HOST_MEMORY_SPREAD_PCT = 65.0
# Flags about one derived value, not the row: the MFU is shown as flagged, while the row's
# throughput, memory and accuracy stand (the ceiling it divides by is what is wrong).
VALUE_FLAGS = ("impossible-mfu",)
TIE_COLUMNS = ("throughput_img_s", "scaling_efficiency", "common_efficiency", "memory_mb", "mIoU",
               "time_to_target_s")
FLAGS = {
    "few-steps": f"fewer than {MIN_MEASURED_STEPS} measured steps",
    "wide-ci": f"95 % CI (or spread of repeats) wider than ±{CI_LIMIT_PCT:g} % of the "
               "throughput",
    "oversubscribed": "more workers than the hardware runs in parallel",
    "emulated-precision": "the precision is emulated by this hardware",
    "impossible-mfu": "MFU above 1: the ceiling it divides by was not measured under the "
                      "step's conditions, so the figure is not a value",
    "wall-gap": f"the measured steps cover less than {WALL_SHARE_MIN * 100:.0f} % of the training "
                "window's wall time (epoch boundaries, loader restarts, checkpoints): the "
                "steady-state throughput overstates the wall-clock rate",
    "not-converged": "training did not converge (no mIoU, loss did not fall, or mIoU "
                     "no better than a constant prediction)",
}

# A family is everything that defines a configuration except its scale: world_size and
# nnodes are the scaling axis (a 2-node 8-worker run is compared with the 1-worker run of
# the same configuration), global_batch_size follows from them. Optional family columns
# are axes a sweep may vary that not every row records (the paper preset varies lr and
# augmentation): used when the table has them, otherwise two such configurations would
# be merged into one family. Both, and the column types, come from the results schema.
FAMILY_COLUMNS = schema.names(family="always")
OPTIONAL_FAMILY_COLUMNS = schema.names(family="optional")
NUMERIC_COLUMNS = schema.names(dtype=("int", "float"))
_BOOL_COLUMNS = schema.names(dtype="bool")
_TEXT_COLUMNS = schema.names(dtype="text")

# Written back into runs.jsonl by annotate(); the rest of DERIVED_COLUMNS is for readers.
ANNOTATION_COLUMNS = ("speedup", "scaling_efficiency", "hw_ceiling_speedup",
                      "throughput_spread_pct", "time_to_target_speedup", "low_confidence",
                      "flags")
DERIVED_COLUMNS = (
    "ok", "family", "config", *ANNOTATION_COLUMNS, "speedup_ci95_lo", "speedup_ci95_hi",
    "scaling_efficiency_ci95_lo", "scaling_efficiency_ci95_hi", "baseline_low_confidence",
    "memory_mb", "memory_source", "pareto", "common_speedup", "common_efficiency",
    "common_baseline",
)
# Engines and loaders are compared against one common baseline: the 1-worker run of the
# same configuration under the first of these engines and loaders the table has (each
# engine's own 1-worker run differs, so per-engine efficiencies do not compare).
COMMON_AXES = ("engine", "zero_stage", "loader", "axis.data.decode")
REFERENCE_ENGINES = ("single", "ddp")
REFERENCE_LOADERS = ("torch", "synthetic", "dali")
# Repeats of one configuration are reduced to the median of these (configurations()).
_MEDIAN_COLUMNS = schema.names(reduce="median")


# --------------------------------------------------------------------------- values


def norm(v: Any) -> Any:
    """A hashable, comparable form of one cell: NaN/None/"" -> None, 8.0 -> 8, a list of
    widths -> ``"16-32-64"``, ``"True"`` -> True, numpy scalars -> Python."""
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
        return "-".join(str(norm(x)) for x in v)
    if isinstance(v, str):
        s = v.strip()
        low = s.lower()
        # Booleans read back from a CSV by something other than pandas.
        if low in ("true", "false"):
            return low == "true"
        return s or None
    return str(v)


def truthy(v: Any) -> bool:
    """True for True, "true", a non-zero number; False for anything else (missing too)."""
    n = norm(v)
    return n is True or (isinstance(n, (int, float)) and not isinstance(n, bool) and n != 0)


def sort_key(v: Any) -> tuple:
    """Sorts mixed cells (None next to ints, strings next to numbers, tuples of them):
    numbers first, then strings, then missing."""
    if v is None:
        return (2, "")
    if isinstance(v, tuple):
        return (0, tuple(sort_key(x) for x in v))
    if isinstance(v, (bool, int, float)):
        return (0, float(v))
    return (1, str(v))


def numeric_column(d: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column as float (NaN where missing), also when ``d`` lacks it."""
    if name not in d:
        return pd.Series(np.nan, index=d.index, dtype=float)
    return pd.to_numeric(d[name], errors="coerce").astype(float)


# --------------------------------------------------------------------------- families


def family_columns(df: pd.DataFrame) -> list[str]:
    """:data:`FAMILY_COLUMNS` plus the optional ones ``df`` has, and every generic sweep
    axis it records (``axis.<path>``: a configuration no other column names)."""
    return [*FAMILY_COLUMNS, *(c for c in OPTIONAL_FAMILY_COLUMNS if c in df.columns),
            *(c for c in df.columns if str(c).startswith("axis."))]


def _batch_key(strong: Any, batch: Any, global_batch: Any) -> Any:
    if truthy(strong):
        return ("global", norm(global_batch))
    return norm(batch)


def family_keys(df: pd.DataFrame, columns: Sequence[str]) -> list[tuple]:
    """One hashable key per row: the normalized values of ``columns``.

    ``batch_size`` stands for the batch that defines the family: the per-worker batch
    under weak scaling, ``("global", N)`` under strong scaling. ``lr`` stands for the
    base lr where the row records one (an lr scaling rule changes the lr with the worker
    count). Columns missing from ``df`` count as ``None``.

    Returns:
        a list of tuples, aligned with ``df``'s rows.
    """
    n = len(df)

    def values(c: str) -> list:
        return [norm(v) for v in df[c]] if c in df.columns else [None] * n

    parts = []
    for c in columns:
        if c == "batch_size":
            parts.append([_batch_key(s, b, g) for s, b, g in
                          zip(values("strong_scaling"), values("batch_size"),
                              values("global_batch_size"))])
        elif c == "lr":
            parts.append([b if b is not None else lr
                          for b, lr in zip(values("base_lr"), values("lr"))])
        else:
            parts.append(values(c))
    return list(zip(*parts)) if parts else [() for _ in range(n)]


# --------------------------------------------------------------------------- frame


def _clean(df: pd.DataFrame | None) -> pd.DataFrame:
    d = pd.DataFrame() if df is None else df.copy()
    d = d.reset_index(drop=True)
    derived = set(DERIVED_COLUMNS)  # recomputed by frame(), whatever the table holds
    typed: dict[str, pd.Series] = {}
    for c in NUMERIC_COLUMNS:
        if c not in derived:
            typed[c] = numeric_column(d, c)
    for c in (*_BOOL_COLUMNS, *_TEXT_COLUMNS):
        if c not in derived:
            typed[c] = pd.Series([norm(v) for v in d[c]] if c in d else [None] * len(d),
                                 index=d.index, dtype=object)
    # One concat, not a column at a time (pandas warns of a fragmented frame otherwise).
    d = pd.concat([d.drop(columns=[c for c in typed if c in d]),
                   pd.DataFrame(typed, index=d.index)], axis=1)
    if len(d):
        # Failed rows of old sweeps recorded widths but not depth.
        from_widths = d["widths"].map(lambda w: float(len(str(w).split("-")))
                                      if w is not None else np.nan).astype(float)
        d["depth"] = d["depth"].fillna(from_widths)
    d["ok"] = (d["status"] == "ok").astype(bool)
    return d


def _per_family_baseline(d: pd.DataFrame, value: pd.Series, usable: pd.Series
                         ) -> pd.Series:
    """Per row, the median of ``value`` over its family's usable 1-worker rows (NaN when
    the family has none): the median, so one slow baseline repeat does not shift every
    speedup of the family."""
    base = usable & (d["world_size"] == 1)
    medians = value[base].groupby(d.loc[base, "family"], sort=False).median()
    return d["family"].map(medians).astype(float)


def _fill_ci(d: pd.DataFrame) -> None:
    tp = d["throughput_img_s"]
    lo, hi, pct = d["throughput_ci95_lo"], d["throughput_ci95_hi"], d["throughput_ci95_pct"]
    with np.errstate(invalid="ignore", divide="ignore"):
        d["throughput_ci95_pct"] = pct.fillna((hi - lo) / 2 / tp * 100)
        d["throughput_ci95_lo"] = lo.fillna(tp * (1 - d["throughput_ci95_pct"] / 100))
        d["throughput_ci95_hi"] = hi.fillna(tp * (1 + d["throughput_ci95_pct"] / 100))


def _speedup(d: pd.DataFrame) -> None:
    tp = d["throughput_img_s"]
    usable = d["ok"] & np.isfinite(tp) & (tp > 0)
    base = _per_family_baseline(d, tp, usable)
    d["speedup"] = (tp / base).where(usable)
    d["scaling_efficiency"] = (d["speedup"] / d["world_size"]).where(d["world_size"] > 0)
    d["hw_ceiling_speedup"] = np.fmin(d["world_size"], d["hw_parallel_limit"]).where(
        d["hw_parallel_limit"].notna() & d["world_size"].notna())
    # The ratio of two independent estimates: relative half-widths add in quadrature
    # (first-order error propagation); without a CI on either side there is no bar.
    base_pct = _per_family_baseline(d, d["throughput_ci95_pct"], usable)
    rel = np.sqrt(d["throughput_ci95_pct"] ** 2 + base_pct ** 2) / 100
    for c in ("speedup", "scaling_efficiency"):
        d[f"{c}_ci95_lo"] = d[c] * (1 - rel)
        d[f"{c}_ci95_hi"] = d[c] * (1 + rel)
    _common(d, tp, usable)
    ttt = d["time_to_target_s"]
    ttt_base = _per_family_baseline(d, ttt, d["ok"] & np.isfinite(ttt) & (ttt > 0))
    d["time_to_target_speedup"] = (ttt_base / ttt).where(d["ok"] & (ttt > 0))


def _rank(v: Any, order: Sequence[str]) -> int:
    return order.index(v) if v in order else len(order)


def _common(d: pd.DataFrame, tp: pd.Series, usable: pd.Series) -> None:
    """``common_speedup`` / ``common_efficiency``: throughput over the common baseline
    of the row's configuration (engine, ZeRO stage and loader set aside): the median of
    the usable 1-worker rows under the first of :data:`REFERENCE_ENGINES` and
    :data:`REFERENCE_LOADERS` present; ``common_baseline`` names it."""
    cols = [c for c in family_columns(d) if c not in COMMON_AXES]
    key = pd.Series(family_keys(d, cols), index=d.index, dtype=object)
    one = usable & (d["world_size"] == 1)
    rank = pd.Series([(_rank(e, REFERENCE_ENGINES), _rank(lo, REFERENCE_LOADERS))
                      for e, lo in zip(d["engine"], d["loader"])], index=d.index,
                     dtype=object)
    base, names = {}, {}
    for k, idx in one[one].groupby(key[one], sort=False).groups.items():
        best = min(rank[idx])
        pick = [i for i in idx if rank[i] == best]
        base[k] = float(tp[pick].median())
        first = d.loc[pick[0]]
        names[k] = f"{first['engine']}/{first['loader']}"
    b = key.map(base).astype(float)
    d["common_speedup"] = (tp / b).where(usable)
    d["common_efficiency"] = (d["common_speedup"] / d["world_size"]).where(
        d["world_size"] > 0)
    d["common_baseline"] = key.map(names).where(usable & b.notna(), None).astype(object)


def _spread(d: pd.DataFrame) -> None:
    tp = d["throughput_img_s"]
    usable = d["ok"] & np.isfinite(tp)
    g = tp[usable].groupby(d.loc[usable, "config"], sort=False)
    stats = pd.DataFrame({"n": g.size(), "lo": g.min(), "hi": g.max(), "med": g.median()})
    stats = stats[stats["n"] > 1]
    spread = (stats["hi"] - stats["lo"]) / stats["med"] * 100
    d["throughput_spread_pct"] = d["config"].map(spread).where(usable).astype(float)


def _not_converged(d: pd.DataFrame) -> pd.Series:
    miou = d["mIoU"]
    trained = (d["mode"].isin(["accuracy", "both"])
               | (d["mode"].isna() & (miou.notna() | d["val_loss"].notna())))
    no_miou = ~np.isfinite(miou)
    loss_flat = d["train_loss_last"] >= d["train_loss_first"]  # NaN compares False
    constant = miou <= 1 / d["num_classes"].where(d["num_classes"] > 0)
    return trained & (no_miou | loss_flat | constant)


def _flags(d: pd.DataFrame) -> None:
    ci_wide = (d["throughput_ci95_pct"] > CI_LIMIT_PCT) | (
        d["throughput_spread_pct"] > CI_LIMIT_PCT)
    checks = {
        "few-steps": d["measured_steps"] < MIN_MEASURED_STEPS,
        "wide-ci": ci_wide,
        "oversubscribed": d["oversubscribed"].map(truthy).astype(bool),
        "emulated-precision": d["precision_emulated"].map(truthy).astype(bool),
        "impossible-mfu": (d["mfu"] > 1) | (numeric_column(d, "mfu_gemm") > 1),
        "wall-gap": d["measured_time_share"] < WALL_SHARE_MIN,  # NaN (older rows): False
        "not-converged": _not_converged(d),
    }
    ok = d["ok"].to_numpy(bool)
    masks = {k: (v.to_numpy(bool) & ok) for k, v in checks.items()}
    d["flags"] = [", ".join(k for k in FLAGS if masks[k][i]) for i in range(len(d))]
    d["low_confidence"] = pd.Series(
        [bool(set(f.split(", ")) - {""} - set(VALUE_FLAGS)) for f in d["flags"]],
        index=d.index, dtype=bool)
    base = d["ok"] & (d["world_size"] == 1)
    weak = set(d.loc[base & d["low_confidence"], "family"])
    d["baseline_low_confidence"] = d["family"].map(lambda k: k in weak).astype(bool)


def _memory(d: pd.DataFrame) -> None:
    # On CPU the process's peak RSS is mostly imported libraries; the peak above the
    # baseline taken after imports and model build is what the workload costs.
    workload = d["mem_workload_mb"].notna()
    d["memory_mb"] = d["mem_workload_mb"].where(workload, d["peak_mem_mb"])
    d["memory_source"] = pd.Series(
        [None if math.isnan(m) else "workload" if w else src
         for m, w, src in zip(d["memory_mb"], workload, d["peak_mem_source"])],
        index=d.index, dtype=object)


def frame(df: pd.DataFrame | None) -> pd.DataFrame:
    """The analysed frame of a results table.

    Clean types: :data:`NUMERIC_COLUMNS` as float (bad cells and missing columns NaN),
    booleans and text normalized with :func:`norm`, ``depth`` filled from ``widths``.
    Then the columns of :data:`DERIVED_COLUMNS` (see the module docstring):

    - ``ok``: status == "ok"; ``family`` and ``config`` (family + world_size): tuples;
    - ``speedup``, ``scaling_efficiency``, ``hw_ceiling_speedup``,
      ``time_to_target_speedup``; ``speedup_ci95_lo/hi`` and
      ``scaling_efficiency_ci95_lo/hi`` (the row's and its baseline's throughput CI);
    - ``throughput_ci95_lo/hi/pct`` completed from one another where one is known;
      ``throughput_spread_pct`` over repeats (NaN for a single run);
    - ``low_confidence``, ``flags``, ``baseline_low_confidence`` (the family's 1-worker
      run, which every speedup rests on, is flagged);
    - ``memory_mb`` (``mem_workload_mb`` when recorded, else ``peak_mem_mb``) and
      ``memory_source`` ("workload", "allocator", "host_peak_rss");
    - ``pareto``: on the accuracy-vs-time Pareto front (:func:`pareto_front`).

    Values the table already holds for derived columns are recomputed. The result is a
    new frame with a fresh index; ``frame(frame(df))`` equals ``frame(df)``.

    Args:
        df: rows as in runs.csv or runs.jsonl (any statuses, gaps allowed), or None.
    """
    d = _clean(df).copy()  # one block per dtype: the columns added below stay cheap
    fam = family_columns(d)
    d["family"] = pd.Series(family_keys(d, fam), index=d.index, dtype=object)
    d["config"] = pd.Series(family_keys(d, [*fam, "world_size"]), index=d.index,
                            dtype=object)
    _fill_ci(d)
    _speedup(d)
    _spread(d)
    _flags(d)
    d = d.copy()  # defragment once (many derived columns were inserted one by one)
    _memory(d)
    d["pareto"] = pareto_front(d)
    return d


def annotate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with :data:`ANNOTATION_COLUMNS` filled, for the sweep to write back.

    Each returned dict is a copy of its input row plus those columns (NaN as None); the
    legacy ``noisy`` key (an older, separate noise rule) is dropped: ``low_confidence``
    and ``flags`` replace it.

    Args:
        rows: every row of a results folder (as :func:`segcore.results.rows.read_records`
            returns them), in table order.

    Returns:
        a new list, aligned with ``rows``.
    """
    if not rows:
        return []
    d = frame(pd.DataFrame(rows))
    out = []
    for row, (_, r) in zip(rows, d.iterrows()):
        new = {k: v for k, v in row.items() if k != "noisy"}
        for c in ANNOTATION_COLUMNS:
            v = r[c]
            if isinstance(v, (np.bool_, bool)):
                new[c] = bool(v)
            elif isinstance(v, str):
                new[c] = v
            else:
                f = float(v)
                new[c] = f if math.isfinite(f) else None
        out.append(new)
    return out


# --------------------------------------------------------------------------- judgements


def analysed(df: pd.DataFrame | None) -> pd.DataFrame:
    """``df`` itself when it is already an analysed frame, else :func:`frame` of it."""
    if df is not None and all(c in df.columns for c in DERIVED_COLUMNS):
        return df
    return frame(df)


def configurations(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (family + worker count) of the ok rows.

    Metrics are the median over the configuration's repeats, other values those of its
    first repeat; ``n_repeats`` counts the repeats, and a configuration is
    ``low_confidence`` when any repeat is (``flags``: every reason of any repeat).

    Args:
        df: rows or an analysed frame.

    Returns:
        a frame in first-seen order, index 0..n-1.
    """
    d = analysed(df)
    ok = d[d["ok"]]
    rows = []
    for _, g in ok.groupby("config", sort=False):
        row = g.iloc[0].to_dict()
        for c in _MEDIAN_COLUMNS:
            row[c] = float(g[c].median()) if g[c].notna().any() else math.nan
        row["n_repeats"] = len(g)
        for c in TIE_COLUMNS:  # the repeats' spread, for telling a lead from noise
            v = pd.to_numeric(g[c], errors="coerce").dropna() if c in g else pd.Series([])
            row[f"{c}_spread_pct"] = (float((v.max() - v.min()) / abs(v.median()) * 100)
                                      if len(v) > 1 and v.median() else math.nan)
        found = {f.strip() for text in g["flags"] for f in text.split(",") if f.strip()}
        row["flags"] = ", ".join(f for f in FLAGS if f in found)
        row["low_confidence"] = bool(found - set(VALUE_FLAGS))
        row["baseline_low_confidence"] = bool(g["baseline_low_confidence"].any())
        rows.append(row)
    if not rows:
        return ok.assign(n_repeats=pd.Series(dtype=int)).reset_index(drop=True)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Best:
    """The best configuration for one objective.

    Attributes:
        objective: what is optimized, in words.
        column: the column compared.
        row: the configuration (a row of :func:`configurations`), or None.
        note: why there is none, when ``row`` is None.
        excluded: configurations that had the metric but were left out because they are
            low-confidence (or, for scaling efficiency, their 1-worker baseline is).
    """

    objective: str
    column: str
    row: pd.Series | None
    note: str | None = None
    excluded: int = 0
    # A lead inside the noise is a tie: the other configurations within ``noise_pct``
    # of the best (their run ids), the best's lead over the runner-up, and whether the
    # run-to-run spread was measured (repeats) or assumed (RUN_TO_RUN_PCT).
    ties: tuple[str, ...] = ()
    lead_pct: float = math.nan
    noise_pct: float = math.nan
    spread_measured: bool = False


def _pick(conf: pd.DataFrame, objective: str, col: str, highest: bool, missing: str,
          pool: pd.DataFrame | None = None) -> Best:
    pool = conf if pool is None else pool
    have = pool[pool[col].notna()] if len(pool) else pool
    if col in SPEED_OBJECTIVES:
        # A speed or memory figure stands whether or not the run converged: only the
        # flags about the measurement itself bar it.
        weak = pd.Series([any(x.strip() in FLAGS and x.strip() != "not-converged"
                               and x.strip() not in VALUE_FLAGS
                               for x in str(f).split(",")) for f in have["flags"]],
                         index=have.index, dtype=bool)
    else:
        weak = have["low_confidence"]
    weak = weak | (have["baseline_low_confidence"] if col == "scaling_efficiency" else False)
    good = have[~weak]
    if not len(have):
        return Best(objective, col, None, missing)
    if not len(good):
        reasons = sorted({f.strip() for t in have["flags"] for f in t.split(",")
                          if f.strip()}, key=list(FLAGS).index)
        why = ", ".join(reasons) or "the 1-worker baseline is low-confidence"
        return Best(objective, col, None, f"all {len(have)} candidate configuration(s) "
                    f"are low-confidence ({why})", excluded=len(have))
    i = good[col].idxmax() if highest else good[col].idxmin()
    best = good.loc[i]
    ties, lead, noise, measured = [], math.nan, math.nan, True
    for j, r in good.drop(index=i).sort_values(col, ascending=not highest).iterrows():
        gap = _gap_pct(best[col], r[col], highest)
        n, m = _noise_pct(best, r, col)
        if math.isnan(lead):
            lead, noise, measured = gap, n, m  # against the runner-up
        if gap <= n:
            ties.append(str(r.get("run_id")))
            noise, measured = max(noise, n), measured and m
    return Best(objective, col, best, excluded=int(weak.sum()), ties=tuple(ties),
                lead_pct=lead, noise_pct=noise, spread_measured=measured)


def _gap_pct(best: float, other: float, highest: bool) -> float:
    """How far ``best`` leads ``other``, in percent of the one behind (or of the best
    when lower is better)."""
    base = abs(other) if highest else abs(best)
    return (best - other if highest else other - best) / base * 100 if base else math.inf


def _noise_pct(a: pd.Series, b: pd.Series, col: str) -> tuple[float, bool]:
    """(the noise a lead between configurations ``a`` and ``b`` must exceed, in percent;
    whether the run-to-run part was measured): their 95 % CIs combined (throughput and
    efficiency) plus the larger spread of their repeats, or, without repeats,
    :data:`RUN_TO_RUN_PCT` assumed."""
    ci = 0.0
    if col in ("throughput_img_s", "scaling_efficiency", "common_efficiency"):
        ci = math.hypot(*(float(x) if x == x else 0.0 for x in
                          (a.get("throughput_ci95_pct"), b.get("throughput_ci95_pct"))))
    spreads = [float(s) for s in (a.get(f"{col}_spread_pct"), b.get(f"{col}_spread_pct"))
               if s is not None and s == s]
    if len(spreads) == 2:
        return ci + max(spreads), True
    if col == "memory_mb" and "allocator" not in (a.get("memory_source"),
                                                  b.get("memory_source")):
        return ci + HOST_MEMORY_SPREAD_PCT, False
    return ci + RUN_TO_RUN_PCT, False


def best_per_objective(df: pd.DataFrame) -> list[Best]:
    """The best configuration per objective, repeats reduced to their median, flagged
    configurations left out.

    Objectives, in report order: highest throughput, best scaling efficiency at the
    largest worker count with an efficiency, lowest memory per worker (``memory_mb``),
    best mIoU, fastest time to target mIoU.

    Args:
        df: rows or an analysed frame.
    """
    conf = configurations(df)
    # Several engines or loaders: efficiency against one common baseline, so an engine
    # whose own 1-worker run is slow does not win on it.
    common = len(conf) and conf[["engine", "zero_stage", "loader"]].astype(str) \
        .drop_duplicates().shape[0] > 1 and conf["common_efficiency"].notna().any()
    col = "common_efficiency" if common else "scaling_efficiency"
    eff = conf[conf[col].notna()] if len(conf) else conf
    top = eff["world_size"].max() if len(eff) else math.nan
    at_top = eff[eff["world_size"] == top] if len(eff) else eff
    return [
        _pick(conf, "Highest throughput", "throughput_img_s", True,
              "no ok run measured throughput"),
        _pick(conf, "Best scaling efficiency at the largest worker count"
              + (f" ({top:g})" if math.isfinite(top) else "")
              + (" against one common 1-worker baseline" if common else ""), col, True,
              "no configuration has both a 1-worker run and a multi-worker run",
              pool=at_top),
        _pick(conf, "Lowest peak memory", "memory_mb", False,
              "no ok run recorded peak memory"),
        _pick(conf, "Best mIoU", "mIoU", True,
              "no ok run measured accuracy (throughput-only sweep?)"),
        _pick(conf, "Fastest time to target mIoU", "time_to_target_s", False,
              "no run reached its target mIoU"),
    ]


def _front(times: Iterable[float], scores: Iterable[float]) -> np.ndarray:
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


def pareto_front(df: pd.DataFrame) -> pd.Series:
    """Which ok runs no other candidate beats on both training time and mIoU.

    Candidates: ok rows with a positive ``train_time_s`` and a finite ``mIoU`` that are
    not low-confidence (not-converged runs included in that). Comparing runs trained to
    different budgets is the caller's caveat (:mod:`segcore.results.caveats`).

    Args:
        df: rows with ``train_time_s``, ``mIoU``, ``ok`` and ``low_confidence`` (an
            analysed frame; computed from the rows when missing).

    Returns:
        a boolean Series aligned with ``df``.
    """
    d = df if {"ok", "low_confidence"} <= set(df.columns) else frame(df).set_index(
        df.index)
    t = numeric_column(d, "train_time_s")
    s = numeric_column(d, "mIoU")
    cand = d["ok"].astype(bool) & ~d["low_confidence"].astype(bool) & (t > 0)
    mask = _front(t.where(cand), s.where(cand))
    return pd.Series(mask, index=d.index, dtype=bool)
