"""One job of a sweep: its torchrun command, its process, and the row of a job that died.

A job is ``torchrun ... launch/train.py --config configs/<run-id>.toml`` plus identity
(run id, sweep id, out); it writes ``runs/<run-id>/result.json``. The job's processes
die with the sweep (``kill -9`` of the driver included): the torchrun agent through
``PR_SET_PDEATHSIG``, its workers through ``SEGBENCH_DIE_WITH_PARENT``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from segcore.config import ConfigError
from segcore.faults import die_with_parent

# launch/train.py's exit code when its outputs could not be written (a full disk, a
# read-only folder: its EXIT_OUTPUT).
EXIT_OUTPUT = 4
from segcore.host import is_launcher_var
from segcore.sweep.grid import Job

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "train.py"

# A parent launcher's variables (torchrun, DeepSpeed, ...: segcore.host.LAUNCHER_ENV) must
# not leak into a child job, or the child would try to join the parent's rendezvous; the
# parent's thread count is not the job's either.
SCRUB_ENV = ("OMP_NUM_THREADS",)


def config_path(out_dir: Path, run_id: str) -> Path:
    return out_dir / "configs" / f"{run_id}.toml"


def job_command(job: Job, out_dir: Path, sweep_id: str, nnodes: int = 1,
                rdzv_endpoint: str | None = None) -> list[str]:
    """The exact torchrun command of one job: its config file plus identity only."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={job.workers}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node)")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={sweep_id}-{job.run_id}"[:120]]
    else:
        # A fresh rendezvous on a free port per job: a previous job's lingering socket
        # cannot collide with it.
        cmd.append("--standalone")
    cmd += [str(TRAIN_SCRIPT), "--config", str(config_path(out_dir, job.run_id)),
            "--run-id", job.run_id, "--sweep-id", sweep_id,
            "--out", str(out_dir / "runs" / job.run_id)]
    return cmd


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment without torchrun/elastic variables (plus ``extra``)."""
    env = {k: v for k, v in os.environ.items()
           if k not in SCRUB_ENV and not is_launcher_var(k)}
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["SEGBENCH_DIE_WITH_PARENT"] = "1"
    env["SEGBENCH_DRIVER_PID"] = str(os.getpid())
    env.update(extra or {})
    return env



def run_job(cmd: list[str], log_path: Path, timeout_s: float, env: dict[str, str],
            keep_fds: tuple[int, ...] = ()) -> tuple[int, bool]:
    """Run one job, its output teed to ``log_path``; (exit code, timed out).

    Args:
        keep_fds: descriptors the job inherits (the sweep's folder lock: an orphaned job
            keeps holding it, so no second writer can start while it runs).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, pass_fds=keep_fds,
                                preexec_fn=die_with_parent)
        try:
            return proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            # The whole process group: torchrun's workers must not outlive the job.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return -1, True
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            raise


_KILLED = re.compile(r"rank\s*:\s*(\d+).*?\n.*?exitcode\s*:\s*-9|"
                     r"exitcode\s*:\s*-9.*?\n.*?rank\s*:\s*(\d+)", re.IGNORECASE)
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")


def classify_failure(rc: int, log_text: str, timed_out: bool) -> tuple[str, str]:
    """(status, error) of a job that did not write its result.

    ``oom`` for CUDA and CPU allocator failures (exit code 3, or their message) and for a
    rank killed by SIGKILL (the kernel's OOM killer), naming the rank; ``timeout``;
    ``diverged`` for a non-finite training loss (exit code 5); otherwise ``failed`` with
    the first ``error:`` line of the log.
    """
    if timed_out:
        return "timeout", "job exceeded the sweep's --timeout and was stopped"
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"\berror: ", ln)]
    diverged = [ln for ln in errors if "error: diverged:" in ln]
    if diverged:
        return "diverged", re.sub(r"^(\[rank \d+\] )?error: ", "", diverged[0])[:500]
    oom = [ln for ln in lines if any(s in ln.lower() for s in _OOM_TEXT)]
    if oom or rc == 3:
        msg = next((ln for ln in errors if any(s in ln.lower() for s in _OOM_TEXT)),
                   oom[0] if oom else "out of memory")
        return "oom", msg[:500]
    killed = _killed_rank(log_text)
    if killed is not None or rc in (-9, 137):
        who = f"rank {killed}" if killed is not None else "the job"
        return "oom", f"{who} was killed (SIGKILL), likely out of memory"
    cause = _root_cause(log_text)
    if cause is not None:  # torchrun names the rank that failed first: its cause is the row's
        rank, code = cause
        own = [ln for ln in lines if re.match(rf"\[rank {rank}\] (error|interrupted)", ln)]
        if own:
            return "failed", re.sub(r"^\[rank (\d+)\] (error: )?", r"rank \1: ", own[0])[:500]
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return "failed", f"rank {rank} was stopped by {name} (exit code {code})"
    if errors:
        # The console adds its own "error:"; keep the rank prefix.
        return "failed", re.sub(r"^(\[rank \d+\] )?error: ", r"\1", errors[0])[:500]
    tail = " | ".join(lines[-3:]) if lines else "(no output)"
    return "failed", f"exit code {rc}: {tail}"[:500]


_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?"
                         r"exitcode\s*:\s*(-?\d+)", re.IGNORECASE | re.DOTALL)


def _root_cause(log_text: str) -> tuple[int, int] | None:
    """(rank, exit code) of the first failed rank in torchrun's failure report."""
    m = _ROOT_CAUSE.search(log_text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _killed_rank(log_text: str) -> int | None:
    """The rank torchrun reports as ended by signal 9, if any."""
    # torchrun's failure report lists, per failed rank, "rank : R (local_rank: L)" and
    # "exitcode : -9 (pid: P)" on neighbouring lines.
    m = _KILLED.search(log_text)
    if m:
        return int(m.group(1) or m.group(2))
    return None


def failure_row(job: Job, sweep_id: str, status: str, error: str, nnodes: int,
                device_type: str, device_name: str) -> dict[str, Any]:
    """A results row for a job that died: the same configuration columns as an ok row
    (from the job's config), plus the status and the cause."""
    from segcore.columns import config_columns

    row: dict[str, Any] = {"sweep_id": sweep_id, "run_id": job.run_id, "status": status,
                           "error": error}
    row.update(config_columns(job.config, nnodes=nnodes, device_type=device_type,
                              device_name=device_name))
    row.update(job.axis_columns())
    row["repeat"] = job.repeat
    return row
