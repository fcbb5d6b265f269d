"""Result rows: the runs.jsonl / runs.csv table of a results folder.

A results folder holds ``runs.jsonl`` (the source of truth, one JSON object per line)
and ``runs.csv`` (re-derived from the jsonl after every append, columns in
:data:`RESULT_COLUMNS` order). Both are written atomically (:mod:`segcore.io`) under a
folder lock, so files always parse and no appender loses a row.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from segcore.io import dumps, folder_lock, write_bytes_atomic, write_text_atomic
from segcore.results import schema

__all__ = [
    "IDENTITY_COLUMNS", "CONFIG_COLUMNS", "SPEED_COLUMNS", "MEMORY_COLUMNS",
    "ACCURACY_COLUMNS", "EXTRA_COLUMNS", "RESULT_COLUMNS", "RUNS_JSONL", "RUNS_CSV",
    "append_row", "replace_row", "write_rows", "read_rows", "read_records", "ordered_columns",
]

RUNS_JSONL = "runs.jsonl"
RUNS_CSV = "runs.csv"

# The runs.csv contract of DESIGN.md section 4; names and order are public. Declared with
# their types, units and repeat reduction in segcore.results.schema.
IDENTITY_COLUMNS = schema.names(group="identity")
CONFIG_COLUMNS = schema.names(group="config")
SPEED_COLUMNS = schema.names(group="speed")
MEMORY_COLUMNS = schema.names(group="memory")
ACCURACY_COLUMNS = schema.names(group="accuracy")
# Beyond the design's list: repeat index and spread, finer timing, provenance, per-phase
# memory, the loader alone, wall-clock figures, and the judgements of
# segcore.results.analysis.annotate.
EXTRA_COLUMNS = schema.names(group="extra")
RESULT_COLUMNS: list[str] = [
    *IDENTITY_COLUMNS, *CONFIG_COLUMNS, *SPEED_COLUMNS, *MEMORY_COLUMNS,
    *ACCURACY_COLUMNS, *EXTRA_COLUMNS,
]
_IOU_PREFIX = "IoU."



# --------------------------------------------------------------------------- rows


def ordered_columns(keys: list[str] | tuple[str, ...]) -> list[str]:
    """Column order of runs.csv for a table whose keys appear in ``keys`` (first-seen).

    Returns:
        all of :data:`RESULT_COLUMNS` (a stable schema even for missing values), then the
        ``IoU.<class>`` columns, then any other extra columns, each in first-seen order.
    """
    known = set(RESULT_COLUMNS)
    seen: dict[str, None] = {}
    for k in keys:
        if k not in known:
            seen.setdefault(k, None)
    iou = [k for k in seen if k.startswith(_IOU_PREFIX)]
    other = [k for k in seen if not k.startswith(_IOU_PREFIX)]
    return [*RESULT_COLUMNS, *iou, *other]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    # Line by line from the bytes: a line torn by a crash (or cut inside a multi-byte
    # character) is one bad line, never an unreadable file.
    for i, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            # Skipping keeps the rest of a sweep usable; the warning names the line so a
            # hand-edited file can be fixed.
            warnings.warn(f"{path}:{i}: skipping a line that is not JSON ({e})",
                          stacklevel=3)
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    keys: list[str] = []
    for r in rows:
        keys.extend(r.keys())
    df = pd.DataFrame(rows, columns=ordered_columns(keys))
    # JSON null arrives as None, which leaves a numeric column with a gap (or a column
    # of gaps) as dtype object; make those float with NaN, as read_csv would.
    for col in df.columns:
        if df[col].dtype != object:
            continue
        values = df[col].dropna()
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            df[col] = pd.to_numeric(df[col])
    return df


def _csv_cell(v: Any) -> Any:
    # Lists / dicts (widths, per-rank values) as JSON, which reads back unambiguously,
    # rather than Python reprs.
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    return v


def _all_int(rows: list[dict[str, Any]], col: str) -> bool:
    values = [r[col] for r in rows if r.get(col) is not None]
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool)
                                for v in values)


def append_row(folder: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append ``row`` to ``folder/runs.jsonl`` and rewrite ``folder/runs.csv``.

    Both files are replaced atomically, and appenders are serialized with a folder
    lock. Keys outside :data:`RESULT_COLUMNS` are kept as extra columns; NaN is
    written as null (an empty CSV cell).

    Args:
        folder: the results folder (created when missing).
        row: one result row; values are converted with :func:`to_jsonable`.
    """
    if not isinstance(row, dict):
        raise TypeError(f"row must be a dict, got {type(row).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    line = dumps(row)
    jsonl = folder / RUNS_JSONL
    with folder_lock(folder):
        old = jsonl.read_bytes() if jsonl.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"  # a torn last line stays one bad line, skipped on reading
        write_bytes_atomic(jsonl, old + (line + "\n").encode("utf-8"))
        _write_csv(folder, _read_jsonl(jsonl))


def replace_row(folder: str | os.PathLike, row: dict[str, Any]) -> None:
    """Record ``row`` in place of the rows of the same ``run_id`` (a configuration run
    again on resume after an environmental failure), atomically, under the lock."""
    folder = Path(folder)
    with folder_lock(folder):
        rows = [r for r in _read_jsonl(folder / RUNS_JSONL)
                if r.get("run_id") != row.get("run_id")]
        write_text_atomic(folder / RUNS_JSONL, "".join(dumps(r) + "\n" for r in rows + [row]))
        _write_csv(folder, _read_jsonl(folder / RUNS_JSONL))


def write_rows(folder: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Replace the whole table (``runs.jsonl`` and ``runs.csv``) with ``rows``, atomically.

    Used after a sweep to fill columns that need every row (speedup, noise flags).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        write_text_atomic(folder / RUNS_JSONL, "".join(dumps(r) + "\n" for r in rows))
        _write_csv(folder, _read_jsonl(folder / RUNS_JSONL))


def _write_csv(folder: Path, rows: list[dict[str, Any]]) -> None:
    df = _frame(rows)
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].map(_csv_cell)
        elif df[col].dtype == "float64" and _all_int(rows, col):
            # An integer column with gaps (e.g. params of a failed run) would be
            # written as 1234.0; the nullable integer type keeps it 1234.
            df[col] = df[col].astype("Int64")
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    write_text_atomic(folder / RUNS_CSV, buf.getvalue())


def read_records(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of ``folder/runs.jsonl`` as plain dicts (JSON nulls as ``None``)."""
    return _read_jsonl(Path(folder) / RUNS_JSONL)


def read_rows(folder: str | os.PathLike) -> pd.DataFrame:
    """All rows of ``folder/runs.jsonl`` as a DataFrame (nulls become NaN / None).

    Returns:
        columns ordered as in runs.csv; an empty frame with :data:`RESULT_COLUMNS` when
        the folder has no rows.
    """
    return _frame(_read_jsonl(Path(folder) / RUNS_JSONL))


