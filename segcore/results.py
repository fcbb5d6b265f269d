"""Result rows, atomic file writes and environment capture.

A results folder holds ``runs.jsonl`` (the source of truth, one JSON object per line)
and ``runs.csv`` (re-derived from the jsonl after every append, columns in
:data:`RESULT_COLUMNS` order). Every file is written atomically: a temp file in the same
folder is written, flushed, fsynced and renamed over the target, so a process killed
mid-write leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

__all__ = [
    "IDENTITY_COLUMNS", "CONFIG_COLUMNS", "SPEED_COLUMNS", "MEMORY_COLUMNS",
    "ACCURACY_COLUMNS", "EXTRA_COLUMNS", "RESULT_COLUMNS", "RUNS_JSONL", "RUNS_CSV",
    "append_row", "read_rows", "ordered_columns", "to_jsonable",
    "write_json_atomic", "write_text_atomic", "capture_env", "hardware_tag",
]

RUNS_JSONL = "runs.jsonl"
RUNS_CSV = "runs.csv"

# The runs.csv contract of DESIGN.md section 4; names and order are public.
IDENTITY_COLUMNS = ("sweep_id", "run_id", "status", "error")
CONFIG_COLUMNS = (
    "engine", "zero_stage", "loader", "precision", "channels_last", "compile",
    "world_size", "nnodes", "device_type", "device_name", "batch_size",
    "global_batch_size", "arch", "depth", "widths", "image_size", "class_scheme",
    "num_classes", "params",
)
SPEED_COLUMNS = (
    "warmup_steps", "measured_steps", "throughput_img_s", "step_ms_p50", "step_ms_p90",
    "step_ms_p99", "data_wait_pct", "speedup", "scaling_efficiency", "tflops", "mfu",
)
MEMORY_COLUMNS = ("peak_mem_mb", "device_mem_mb", "host_rss_mb", "gpu_util_pct", "power_w")
ACCURACY_COLUMNS = (
    "epochs", "train_time_s", "time_to_target_s", "val_loss", "aAcc", "mIoU", "mDice",
    "mAcc",
)
# Beyond the design's list: repeat index and spread, finer timing, provenance.
EXTRA_COLUMNS = (
    "repeat", "step_ms_mean", "step_ms_std", "fwd_bwd_ms_p50", "optim_ms_p50",
    "launch_overhead_s", "peak_mem_source", "noisy", "throughput_spread_pct",
    "started_at", "finished_at", "wall_s",
)
RESULT_COLUMNS: list[str] = [
    *IDENTITY_COLUMNS, *CONFIG_COLUMNS, *SPEED_COLUMNS, *MEMORY_COLUMNS,
    *ACCURACY_COLUMNS, *EXTRA_COLUMNS,
]
_IOU_PREFIX = "IoU."


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
    if value is pd.NA or value is pd.NaT:
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


def _dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)


# --------------------------------------------------------------------------- atomic I/O


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating parent folders.

    The temp file (``.<name>.<random>.tmp``) lives in the target's folder because
    ``os.replace`` is only atomic within one file system. It is fsynced before the
    rename so that a crash cannot expose a renamed-but-empty file.
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
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN written as null)."""
    write_text_atomic(path, _dumps(obj, indent=2) + "\n")


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every OS / file system.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive advisory lock on the folder, so two appenders cannot lose a row."""
    # The folder itself is locked (not runs.jsonl) because runs.jsonl is replaced by
    # rename on every write, which would leave a lock on a stale inode.
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


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
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
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
    line = _dumps(row)
    jsonl = folder / RUNS_JSONL
    with _folder_lock(folder):
        old = jsonl.read_text(encoding="utf-8") if jsonl.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        write_text_atomic(jsonl, old + line + "\n")
        _write_csv(folder, _read_jsonl(jsonl))


def write_rows(folder: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Replace the whole table (``runs.jsonl`` and ``runs.csv``) with ``rows``, atomically.

    Used after a sweep to fill columns that need every row (speedup, noise flags).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_lock(folder):
        write_text_atomic(folder / RUNS_JSONL, "".join(_dumps(r) + "\n" for r in rows))
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


# --------------------------------------------------------------------------- environment


def _guard(fn: Any, default: Any = None) -> Any:
    """``fn()``, or ``default`` when it fails: environment probing must never raise."""
    try:
        return fn()
    except Exception:
        return default


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    if value.strip():
                        return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _mem_total_mb() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024.0
    return _guard(lambda: __import__("psutil").virtual_memory().total / 2 ** 20)


def _dist_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return None


def _torch_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch_version": None, "torch_num_threads": None, "cuda_version": None,
        "cudnn_version": None, "nccl_version": None, "cuda_available": False,
        "cuda_device_count": 0, "cuda_devices": [],
    }
    try:
        import torch
    except Exception:
        return info
    info["torch_version"] = torch.__version__
    info["torch_num_threads"] = _guard(torch.get_num_threads)
    info["cuda_version"] = torch.version.cuda
    info["cudnn_version"] = _guard(torch.backends.cudnn.version)

    def nccl() -> str | None:
        v = torch.cuda.nccl.version()
        if isinstance(v, tuple):
            return ".".join(map(str, v))
        # Older torch encodes 2.18.3 as 21803.
        return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if isinstance(v, int) else str(v)

    info["nccl_version"] = _guard(nccl) if torch.version.cuda else None
    if _guard(torch.cuda.is_available, False):
        n = _guard(torch.cuda.device_count, 0)
        info["cuda_available"] = True
        info["cuda_device_count"] = n
        devices = []
        for i in range(n):
            props = _guard(lambda i=i: torch.cuda.get_device_properties(i))
            devices.append({
                "index": i,
                "name": getattr(props, "name", None),
                "memory_mb": (props.total_memory / 2 ** 20) if props is not None else None,
                "capability": (f"{props.major}.{props.minor}" if props is not None else None),
            })
        info["cuda_devices"] = devices
    return info


def _nvml_info() -> dict[str, Any]:
    info: dict[str, Any] = {"nvidia_driver_version": None, "nvml_gpus": [], "nvml_error": None}
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # no pynvml, no driver, no GPU: all normal on CPU hosts
        info["nvml_error"] = f"{type(e).__name__}: {e}"
        return info
    try:
        drv = pynvml.nvmlSystemGetDriverVersion()
        info["nvidia_driver_version"] = drv.decode() if isinstance(drv, bytes) else drv
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_mb": _guard(lambda h=h: pynvml.nvmlDeviceGetMemoryInfo(h).total
                                    / 2 ** 20),
            })
        info["nvml_gpus"] = gpus
    except Exception as e:
        info["nvml_error"] = f"{type(e).__name__}: {e}"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return info


def _dali_version() -> str | None:
    # Version metadata first: importing DALI initialises CUDA bits and is slow; the
    # import is the fallback for source builds without distribution metadata.
    v = _dist_version("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110",
                      "nvidia-dali")
    if v is not None:
        return v
    try:
        import nvidia.dali as dali

        return getattr(dali, "__version__", None)
    except Exception:
        return None


def _git_info(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip()

    commit = _guard(lambda: git("rev-parse", "HEAD"))
    dirty = None
    if commit is not None:
        # Untracked files are ignored: results folders and caches would mark every
        # benchmarking checkout as dirty.
        status = _guard(lambda: git("status", "--porcelain", "--untracked-files=no"))
        dirty = None if status is None else bool(status)
    return {"git_commit": commit, "git_dirty": dirty}


def _host_count() -> int:
    for var in ("NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


# Environment variables worth recording; a whitelist so that no secrets are captured.
_ENV_VARS = (
    "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "WORLD_SIZE",
    "LOCAL_WORLD_SIZE", "NNODES", "SLURM_JOB_ID", "SLURM_NNODES", "NCCL_DEBUG",
    "NCCL_P2P_DISABLE", "NCCL_IB_DISABLE", "TORCH_CUDNN_V8_API_ENABLED",
)


def capture_env(argv: list[str] | None = None) -> dict[str, Any]:
    """Describe the software and hardware of this host for ``env.json``.

    Every probe is guarded: a missing package, driver or git yields ``None`` rather than
    an exception. DeepSpeed (and DALI, when it has metadata) is read from package
    metadata rather than imported, because importing them is slow and noisy.

    Args:
        argv: the command line to record; ``sys.argv`` when None.

    Returns:
        A JSON-serializable dict: ``timestamp_utc``, ``python_version``, ``platform``,
        ``hostname``, ``cpu_model``, ``cpu_count``, ``cpu_affinity_count``,
        ``mem_total_mb``, ``torch_version``, ``torch_num_threads``, ``cuda_version``,
        ``cudnn_version``, ``nccl_version``, ``cuda_available``, ``cuda_device_count``,
        ``cuda_devices``, ``nvidia_driver_version``, ``nvml_gpus``, ``nvml_error``,
        ``dali_version``, ``deepspeed_version``, ``numpy_version``, ``pandas_version``,
        ``git_commit``, ``git_dirty``, ``host_count``, ``argv``, ``command_line``,
        ``env_vars``, ``accelerator``.
    """
    argv = list(sys.argv if argv is None else argv)
    env: dict[str, Any] = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": _guard(socket.gethostname),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity_count": _guard(lambda: len(os.sched_getaffinity(0)), os.cpu_count()),
        "mem_total_mb": _mem_total_mb(),
    }
    env.update(_torch_info())
    env.update(_nvml_info())
    env["dali_version"] = _dali_version()
    env["deepspeed_version"] = _guard(lambda: _dist_version("deepspeed"))
    env["numpy_version"] = _guard(lambda: _dist_version("numpy"))
    env["pandas_version"] = pd.__version__
    env.update(_git_info(Path(__file__).resolve().parent.parent))
    env["host_count"] = _host_count()
    env["argv"] = argv
    env["command_line"] = _guard(lambda: shlex.join(argv), " ".join(argv))
    env["env_vars"] = {k: os.environ[k] for k in _ENV_VARS if k in os.environ}
    env["accelerator"] = "cuda" if env["cuda_available"] else "cpu"
    return to_jsonable(env)


# --------------------------------------------------------------------------- hardware tag

_GPU_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro", "graphics"}
_CPU_NOISE = re.compile(
    r"\((r|tm|c)\)|\bcpu\b|@.*$|\bprocessor\b|\b\d+-core\b|\bplatinum\b|\bgold\b|"
    r"\bsilver\b|\bbronze\b|\bwith\b.*$", re.IGNORECASE)


def _slug(text: str, limit: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "unknown"


def _gpu_short(name: str, memory_mb: float | None) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"H100-80GB"``; ``"NVIDIA A100-SXM4-40GB"`` ->
    ``"A100-SXM4-40GB"``."""
    tokens = [t for t in re.split(r"[\s_\-/]+", name) if t]
    mem = None
    kept = []
    for t in tokens:
        m = re.fullmatch(r"(\d+)GB", t, flags=re.IGNORECASE)
        if m:
            mem = int(m.group(1))
        elif t.lower() in _GPU_VENDOR_WORDS or re.fullmatch(r"(HBM|GDDR)\w*", t, re.I):
            continue
        else:
            kept.append(t)
    if mem is None and memory_mb:
        mem = int(round(float(memory_mb) / 1024.0))
    short = "-".join(kept) or "GPU"
    return f"{short}-{mem}GB" if mem else short


def hardware_tag(env: dict[str, Any]) -> str:
    """A short, filesystem-safe name of the hardware, for naming results folders.

    Args:
        env: a dict from :func:`capture_env` (missing keys are tolerated).

    Returns:
        e.g. ``"1xH100-80GB"``, ``"2n-8xA100-SXM4-80GB"`` (two hosts) or
        ``"cpu-2c-intel-xeon-8481c"``; only ``[A-Za-z0-9._-]`` characters.
    """
    gpus = [(d.get("name") or "GPU", d.get("memory_mb"))
            for d in (env.get("cuda_devices") or []) if isinstance(d, dict)]
    if not gpus:
        gpus = [(d.get("name") or "GPU", d.get("memory_mb"))
                for d in (env.get("nvml_gpus") or []) if isinstance(d, dict)]
    hosts = env.get("host_count") or 1
    prefix = f"{int(hosts)}n-" if isinstance(hosts, int) and hosts > 1 else ""
    if gpus:
        counts = Counter(_gpu_short(n, m) for n, m in gpus)
        tag = "+".join(f"{c}x{s}" for s, c in counts.items())
    else:
        cores = env.get("cpu_affinity_count") or env.get("cpu_count") or 0
        model = _CPU_NOISE.sub(" ", str(env.get("cpu_model") or "unknown"))
        tag = f"cpu-{int(cores)}c-{_slug(model)}"
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", prefix + tag).strip("-.")
    return tag or "unknown"
