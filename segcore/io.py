"""Plain-file I/O every part of the suite shares: JSON values and atomic writes.

Every file is written atomically: a temp file in the same folder is written, flushed,
fsynced and renamed over the target, so a process killed mid-write leaves either the old
or the new file, never half of one. Imports nothing heavy (no pandas, no torch), so
writing a JPEG or a JSON file stays cheap.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

# --------------------------------------------------------------------------- JSON values


def to_jsonable(value: Any) -> Any:
    """Convert ``value`` into plain JSON types.

    NaN and infinities become ``None`` (JSON has no NaN; Python's ``NaN`` token breaks
    other readers), numpy/torch scalars and arrays become Python numbers and lists,
    tuples and sets become lists, paths and datetimes become strings, anything else its
    ``str()``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):  # also numpy.float64, a float subclass
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(value, key=str)]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    pd = sys.modules.get("pandas")
    if pd is not None and (value is pd.NA or value is pd.NaT):
        return None
    # numpy scalars / arrays and torch tensors, without importing either here.
    if hasattr(value, "tolist") and callable(value.tolist):
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        return to_jsonable(value.tolist())
    if hasattr(value, "item") and callable(value.item):
        try:
            return to_jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)


# --------------------------------------------------------------------------- atomic I/O


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f: f.write(...)``: ``path`` appears whole or not at all.

    The temp file (``.<name>.<random>.tmp``) lives in the target's folder because
    ``os.replace`` is only atomic within one file system. It is fsynced before the
    rename so that a crash cannot expose a renamed-but-empty file, and removed when the
    write fails (a full disk leaves the old file and no temp file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644  # mkstemp creates 0600; results should be readable by the group
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating parent folders (see
    :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)


def save_figure_atomic(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure written as PNG atomically (rendered in memory, then temp +
    rename): every figure of the suite goes through here, so a killed run or a full disk
    never leaves half a picture. Creates the folder; returns the path."""
    import io as _io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_bytes_atomic(path, buf.getvalue())
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN written as null)."""
    write_text_atomic(path, dumps(obj, indent=2) + "\n")


def fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every OS / file system.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Folders this process holds an exclusive lock on for its whole life (a sweep's writer).
_HELD_FOLDERS: set[tuple[int, int]] = set()


@contextlib.contextmanager
def hold_folder(fd: int) -> Iterator[None]:
    """Mark the folder open at ``fd`` (already flock-ed by the caller) as held by this
    process while the block runs, so :func:`folder_lock` does not wait on itself."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    _HELD_FOLDERS.add(key)
    try:
        yield
    finally:
        _HELD_FOLDERS.discard(key)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive advisory lock on the folder, so two appenders cannot lose a row. A
    process that already holds the folder (a sweep's writer lock, :func:`hold_folder`)
    is its only writer and takes nothing more."""
    # The folder itself is locked (not runs.jsonl) because runs.jsonl is replaced by
    # rename on every write, which would leave a lock on a stale inode.
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) not in _HELD_FOLDERS:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock

