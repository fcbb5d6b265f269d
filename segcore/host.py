"""The host: CPU name and usable cores, software versions, environment capture and a
short hardware tag for naming results folders. Every probe is guarded: a missing package,
driver or git yields ``None`` rather than an exception.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from segcore.io import to_jsonable

# What a launcher (torchrun/torchelastic, the DeepSpeed launcher, Open MPI) sets for its own
# workers. A process the sweep driver starts must not inherit it, or it tries to join the
# launcher's rendezvous: with TORCHELASTIC_USE_AGENT_STORE torch connects to MASTER_PORT
# as a store *client* and waits there until its timeout.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "NODE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE",
                "TORCH_NCCL_ASYNC_ERROR_HANDLING")
LAUNCHER_ENV_PREFIXES = ("TORCHELASTIC_", "OMPI_COMM_WORLD_")


def is_launcher_var(name: str) -> bool:
    """Whether ``name`` is a variable a launcher set for its workers (:data:`LAUNCHER_ENV`)."""
    return name in LAUNCHER_ENV or name.startswith(LAUNCHER_ENV_PREFIXES)


def scrub_launcher_env(env: "os._Environ[str] | dict[str, str] | None" = None) -> None:
    """Remove the launcher's variables from ``env`` (default: this process's environment),
    so that a process group made here is this process's own."""
    env = os.environ if env is None else env
    for name in [k for k in env if is_launcher_var(k)]:
        del env[name]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)



def parallel_limit(threads_per_worker: int, gpus: int = 0) -> int:
    """Workers this host runs side by side without sharing hardware: visible GPUs, or on
    a CPU host the usable cores over the threads each worker uses."""
    if gpus:
        return gpus
    return max(1, usable_cores() // max(1, threads_per_worker))


def oversubscription(local_workers: int, threads_per_worker: int, gpus: int = 0) -> str:
    """Why ``local_workers`` workers oversubscribe this host, or ``""`` when they fit.

    CPU: workers x threads > usable cores; GPU: workers per node > visible GPUs. A speedup
    measured past that point shows time-sharing, not scaling.
    """
    if gpus:
        if local_workers > gpus:
            return f"{local_workers} workers share {gpus} visible GPU(s)"
        return ""
    cores = usable_cores()
    if local_workers * threads_per_worker > cores:
        return (f"{local_workers} worker(s) x {threads_per_worker} thread(s) > {cores} usable "
                f"core(s): at most {parallel_limit(threads_per_worker)} worker(s) run in "
                "parallel here")
    return ""


def _guard(fn: Any, default: Any = None) -> Any:
    """``fn()``, or ``default`` when it fails: environment probing must never raise."""
    try:
        return fn()
    except Exception:
        return default


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    if value.strip():
                        return value.strip()
    return platform.processor() or platform.machine() or "unknown"


# CPU flags that change results: which precisions run natively, which vector width.
RESULT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile",
                "amx_fp16", "sve", "asimd")


def cpu_identity() -> dict[str, Any]:
    """The CPU beyond its marketing name: vendor, family, model and stepping (two
    "AMD EPYC" hosts can be two generations apart), and the :data:`RESULT_FLAGS` it has."""
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "vendor_id":
                    out["vendor"] = value
                elif key in ("cpu family", "model", "stepping") and value.isdigit():
                    out[key.replace("cpu ", "")] = int(value)
                elif key in ("flags", "Features"):
                    have = set(value.split())
                    out["flags"] = [f for f in RESULT_FLAGS if f in have]
    return out


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
        ``hostname``, ``cpu_model``, ``cpu_id`` (:func:`cpu_identity`), ``cpu_count``,
        ``cpu_affinity_count``,
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
        "cpu_model": cpu_model(),
        "cpu_id": cpu_identity(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity_count": usable_cores(),
        "mem_total_mb": _mem_total_mb(),
    }
    env.update(_torch_info())
    env.update(_nvml_info())
    env["dali_version"] = _dali_version()
    env["deepspeed_version"] = _guard(lambda: _dist_version("deepspeed"))
    env["numpy_version"] = _guard(lambda: _dist_version("numpy"))
    env["pandas_version"] = _guard(lambda: _dist_version("pandas"))
    env.update(_git_info(Path(__file__).resolve().parents[1]))
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
        ``"cpu-2c-amd-epyc-f26m2"`` (``-f<family>m<model>`` where the env records the
        CPU's identity); only ``[A-Za-z0-9._-]`` characters.
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
        ident = env.get("cpu_id") or {}
        if isinstance(ident, dict) and "family" in ident and "model" in ident:
            # one marketing name covers generations: family and model tell them apart
            tag += f"-f{ident['family']}m{ident['model']}"
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", prefix + tag).strip("-.")
    return tag or "unknown"
