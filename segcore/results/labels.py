"""How configurations are named and told apart in figures, legends and tables.

A configuration is named by the values that differ between the rows shown (``"deepspeed
ZeRO-2, bf16, batch 16, 4 workers"``), never by what every row shares. Figures map
those differing values to panels, colours and line styles (:mod:`segcore.results.panels`),
outermost dimension first (:data:`DIM_ORDER`). Also the one-line context under every
figure title and the short names of results folders in a comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from segcore.errors import ConfigError
from segcore.host import hardware_tag
from segcore.registry import engine_spec
from segcore.results import schema
from segcore.results.analysis import analysed, family_columns, family_keys, norm
from segcore.results.caveats import is_cpu, read_env

__all__ = ["DIM_ORDER", "piece", "describe_keys", "describe_rows", "default_label",
           "dim_rank", "describe_context", "folder_labels", "seconds"]

# Columns redundant with others in most sweeps (widths follow depth, params follow
# widths and classes): dropped from a label when the labels stay distinct without them.
_REDUNDANT = ("params", "num_classes", "widths", "device_type", "device_name", "mode",
              "strong_scaling")


# Outermost first: facets (one panel per value) are taken from the front, colours and
# line styles from the back, so that a panel compares what a reader compares first
# (worker counts, batch sizes, depths) within one engine / precision / dataset.
DIM_ORDER = (
    "device_name", "device_type", "class_scheme", "num_classes", "mode", "strong_scaling",
    "engine", "loader", "precision", "channels_last", "compile", "arch", "norm",
    "image_size", "lr_scaling", "lr", "augment", "optimizer", "loss", "class_weights",
    "grad_accum", "params", "widths", "depth", "batch_size", "world_size",
)


def piece(col: str, v: Any, key: dict[str, Any]) -> str:
    """Compact text of one configuration value, for legends and panel titles."""
    if v is None:
        return f"{col} ?"
    if col == "engine":
        try:
            return engine_spec(v).label(key.get("zero_stage"))
        except ConfigError:
            return str(v)  # an engine this version does not know (an older folder)
    if col == "zero_stage":
        return f"ZeRO-{v}"
    if col.startswith("axis."):
        return f"{col.rpartition('.')[2]} {v}"  # a generic sweep axis (--axis PATH=...)
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
    return (schema.label_format(col) or col + " {}").format(v)


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


def describe_keys(keys: Sequence[tuple], cols: Sequence[str], always: Sequence[str] = (),
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
        out.append({c: piece(c, kd[c], kd) for c in shown
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
    d = analysed(df)
    cols = list(columns) if columns is not None else family_columns(d) + ["world_size"]
    keys = family_keys(d, cols)
    return [", ".join(x.values()) for x in describe_keys(keys, cols, always)]


def default_label(key: tuple, cols: Sequence[str]) -> str:
    """What a lone line is, when nothing varies to tell it from others."""
    kd = dict(zip(cols, key))
    parts = [piece(c, kd[c], kd) for c in ("engine", "precision", "batch_size", "depth",
                                            "world_size")
             if c in kd and kd[c] is not None]
    return ", ".join(parts) or "all runs"


def dim_rank(col: str) -> int:
    # Unknown (user-given) columns sit between the engine-like and the size-like ones.
    return DIM_ORDER.index(col) if col in DIM_ORDER else DIM_ORDER.index("image_size")


# --------------------------------------------------------------------------- context


def describe_context(df: pd.DataFrame | None, env: dict[str, Any],
                     folder: str | None = None) -> str:
    """One line naming the results folder, sweep and hardware, drawn under every figure
    title.

    Args:
        df: the rows (for the sweep id and device type); may be None.
        env: env.json contents; may be empty.
        folder: the results folder's name: figures are titled with their own folder,
            and a sweep id that differs from it (a folder renamed or copied) is named
            as the sweep id, apart.

    Returns:
        e.g. ``"sweep s1 · cpu-2c-intel-xeon · CPU: relative effects, not GPU
        performance"`` or ``"v0.1 (sweep id s1) · ..."``.
    """
    parts = []
    ids = []
    if df is not None and "sweep_id" in df:
        ids = sorted({str(v) for v in (norm(x) for x in df["sweep_id"]) if v is not None})
    if not ids and env.get("sweep_id"):
        ids = [str(env["sweep_id"])]
    shown = ", ".join(ids[:2]) + (" ..." if len(ids) > 2 else "")
    if folder and ids and ids != [folder]:
        parts.append(f"{folder} (sweep id {shown})")
    elif folder:
        parts.append(folder)
    elif ids:
        parts.append("sweep " + shown)
    tag = hardware_tag(env) if env else None
    if tag and not any(i.startswith(tag) for i in ids):  # default ids start with the tag
        parts.append(tag)
    if is_cpu(df, env):
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


def seconds(t: float) -> str:
    return f"{t:.0f} s" if t >= 100 else f"{t:.3g} s"

