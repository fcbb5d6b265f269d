"""The sweep: expand a grid, run each configuration as a fresh torchrun job, record rows.

The sweep never trains in its own process. Each configuration becomes one
``torchrun ... launch/train.py ...`` job with exactly the requested number of workers,
a fresh rendezvous (free port, or a per-configuration rendezvous id across nodes) and an
environment scrubbed of the parent's torchrun variables. The job writes its row to
``<out>/runs/<run_id>/result.json``; the sweep appends it to ``runs.jsonl``/``runs.csv``
atomically, or records a row with status ``oom``, ``failed`` or ``timeout`` and the cause
when the job dies. ``--resume`` skips configurations already recorded.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from segcore.config import ConfigError, widths_for_depth

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "train.py"

# Variables a parent torchrun (or Slurm/torchelastic) sets that must not leak into a
# child job, or the child would try to join the parent's rendezvous.
SCRUB_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
             "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
             "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
             "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
             "OMP_NUM_THREADS")

Log = Callable[[str], None]


@dataclass(frozen=True)
class Job:
    """One configuration of the grid (flags for launch/train.py) and its worker count."""

    run_id: str
    workers: int  # per node
    flags: tuple[tuple[str, str], ...]  # (--flag, value); value "" for a switch
    repeat: int = 0

    def flag(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.flags:
            if k == name:
                return v
        return default


@dataclass
class SweepSpec:
    """The grid and how to run it (built by ``launch/sweep.py`` from its flags)."""

    workers: list[int]
    batch_sizes: list[int]
    depths: list[int]
    engines: list[str]  # "ddp", "deepspeed:2", "single"
    loaders: list[str]
    precisions: list[str]
    channels_last: list[bool]
    data: str = "synthetic"
    classes: str = "six"
    arch: str = "modern"
    mode: str = "both"
    image_size: int = 128
    epochs: int = 3
    steps: int | None = None
    warmup_steps: int = 3
    lr: float | None = None
    repeats: int = 1
    strong_scaling: bool = False
    threads: int = 0
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    timeout_s: float = 1800.0
    extra: list[tuple[str, str]] = field(default_factory=list)  # passed to every job
    preset_rows: list[dict[str, Any]] | None = None  # a preset's explicit configurations


def parse_engine(spec: str) -> tuple[str, int]:
    """``ddp`` -> ("ddp", 0); ``deepspeed:2`` -> ("deepspeed", 2)."""
    name, _, stage = spec.partition(":")
    if name not in ("ddp", "deepspeed", "single"):
        raise ConfigError(f"--engines: {spec!r} is not an engine; use ddp, single, "
                          "deepspeed:0, deepspeed:1, deepspeed:2 or deepspeed:3")
    if name != "deepspeed":
        if stage:
            raise ConfigError(f"--engines: {spec!r}: only deepspeed takes a ZeRO stage")
        return name, 0
    if stage not in ("", "0", "1", "2", "3"):
        raise ConfigError(f"--engines: {spec!r}: the ZeRO stage must be 0, 1, 2 or 3")
    return name, int(stage or 0)


def preset(name: str) -> dict[str, Any]:
    """Named grids. ``paper`` reproduces the reference study's configurations:
    binary at lr 1e-4 / batch 8 and six classes at lr 1e-3 / batch 16, the study's three
    U-Nets (16,32,64), (16,64,128), (16,32,64,256), with and without augmentation, paper
    architecture, 15 % test split."""
    if name == "paper":
        rows = []
        for classes, lr, batch in (("binary", 1e-4, 8), ("six", 1e-3, 16)):
            for widths in ("16,32,64", "16,64,128", "16,32,64,256"):
                for augment in (True, False):
                    rows.append({"classes": classes, "lr": lr, "batch": batch,
                                 "widths": widths, "augment": augment})
        return {"arch": "paper", "rows": rows}
    if name == "smoke":
        return {"rows": [{"classes": "six", "batch": 4, "widths": "8,16", "augment": True}],
                "image_size": 64, "epochs": 1}
    raise ConfigError(f"--preset {name!r} is unknown; choose one of: paper, smoke")


def _slug(v: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", v)


def expand(spec: SweepSpec) -> list[Job]:
    """The grid as an ordered list of jobs (workers vary fastest, so each family's
    1-worker baseline runs first)."""
    for w in spec.workers:
        if w < 1:
            raise ConfigError(f"--gpus: worker counts must be >= 1, got {w}")
    base: list[dict[str, Any]] = []
    if spec.preset_rows is not None:
        base = [dict(r) for r in spec.preset_rows]
    else:
        for b, d in itertools.product(spec.batch_sizes, spec.depths):
            base.append({"batch": b, "widths": ",".join(map(str, widths_for_depth(d))),
                         "classes": spec.classes, "augment": True})
    jobs = []
    for row, engine, loader, prec, cl in itertools.product(
            base, spec.engines, spec.loaders, spec.precisions, spec.channels_last):
        name, stage = parse_engine(engine)
        for workers in sorted(spec.workers):
            if name == "single" and workers * spec.nnodes > 1:
                continue  # the single engine is the 1-process baseline only
            flags: list[tuple[str, str]] = [
                ("--data", spec.data), ("--classes", row["classes"]),
                ("--arch", spec.arch), ("--widths", row["widths"]),
                ("--image-size", str(spec.image_size)), ("--batch-size", str(row["batch"])),
                ("--engine", name), ("--loader", loader), ("--precision", prec),
                ("--channels-last" if cl else "--no-channels-last", ""),
                ("--mode", spec.mode), ("--epochs", str(spec.epochs)),
                ("--warmup-steps", str(spec.warmup_steps)),
                ("--threads", str(spec.threads)),
            ]
            if name == "deepspeed":
                flags.append(("--zero-stage", str(stage)))
            if spec.steps:
                flags.append(("--steps", str(spec.steps)))
            lr = row.get("lr", spec.lr)
            if lr is not None:
                flags.append(("--lr", repr(lr)))
            if not row.get("augment", True):
                flags.append(("--no-augment", ""))
            if spec.strong_scaling:
                flags.append(("--strong-scaling", ""))
            flags += spec.extra
            eng = name if name != "deepspeed" else f"ds{stage}"
            world = workers * spec.nnodes
            rid = "-".join([f"w{world}", row["classes"], f"u{_slug(row['widths'])}",
                            f"b{row['batch']}", eng, loader, prec, "cl" if cl else "nchw"]
                           + ([] if row.get("augment", True) else ["noaug"])
                           + ([f"lr{row['lr']:g}"] if "lr" in row else []))
            for r in range(spec.repeats):
                jobs.append(Job(rid + (f"-r{r}" if spec.repeats > 1 else ""), workers,
                                tuple(flags), r))
    return jobs


def job_command(job: Job, spec: SweepSpec, out_dir: Path, sweep_id: str) -> list[str]:
    """The exact torchrun command of one job."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={job.workers}"]
    if spec.nnodes > 1:
        if not spec.rdzv_endpoint:
            raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node)")
        cmd += [f"--nnodes={spec.nnodes}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={spec.rdzv_endpoint}",
                f"--rdzv-id={sweep_id}-{job.run_id}"[:120]]
    else:
        # A fresh rendezvous on a free port per job: a previous job's lingering socket
        # cannot collide with it.
        cmd.append("--standalone")
    cmd.append(str(TRAIN_SCRIPT))
    for k, v in job.flags:
        cmd += [k, v] if v != "" else [k]
    cmd += ["--run-id", job.run_id, "--sweep-id", sweep_id, "--out",
            str(out_dir / "runs" / job.run_id)]
    return cmd


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment without torchrun/elastic variables (plus ``extra``)."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUB_ENV}
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def classify_failure(rc: int, log_text: str, timed_out: bool) -> tuple[str, str]:
    """(status, error) of a job that did not write its result."""
    if timed_out:
        return "timeout", "job exceeded the sweep's --timeout and was stopped"
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"\berror: ", ln)]
    if any("out of memory" in ln.lower() for ln in lines) or rc == 3:
        msg = next((ln for ln in errors if "out of memory" in ln.lower()),
                   "out of memory")
        return "oom", msg[:500]
    if errors:
        return "failed", errors[0][:500]
    tail = " | ".join(lines[-3:]) if lines else "(no output)"
    return "failed", f"exit code {rc}: {tail}"[:500]


def run_job(cmd: list[str], log_path: Path, timeout_s: float,
            env: dict[str, str]) -> tuple[int, bool]:
    """Run one job, its output teed to ``log_path``; (exit code, timed out)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
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


def failure_row(job: Job, spec: SweepSpec, sweep_id: str, status: str,
                error: str) -> dict[str, Any]:
    """A results row for a job that died: its configuration and the cause."""
    name = job.flag("--engine", "ddp")
    workers = job.workers * spec.nnodes
    batch = int(job.flag("--batch-size", "0") or 0)
    widths = job.flag("--widths", "")
    return {"sweep_id": sweep_id, "run_id": job.run_id, "status": status, "error": error,
            "engine": name, "zero_stage": int(job.flag("--zero-stage", "0") or 0),
            "loader": job.flag("--loader"), "precision": job.flag("--precision"),
            "channels_last": job.flag("--channels-last") is not None,
            "compile": False, "world_size": workers, "nnodes": spec.nnodes,
            "batch_size": batch, "global_batch_size": batch * workers,
            "arch": job.flag("--arch"), "depth": len(widths.split(",")) if widths else None,
            "widths": widths.replace(",", "-"),
            "image_size": int(job.flag("--image-size", "0") or 0),
            "class_scheme": job.flag("--classes"), "repeat": job.repeat}


def recorded_ids(out_dir: Path) -> set[str]:
    from segcore.sweep.rows import read_records

    return {r.get("run_id") for r in read_records(out_dir)}


def mark_noise(rows: list[dict[str, Any]], limit_pct: float = 10.0) -> None:
    """Spread of throughput over repeats of one configuration; above ``limit_pct`` the
    configuration's rows are flagged ``noisy``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("throughput_img_s"):
            groups.setdefault(re.sub(r"-r\d+$", "", str(r["run_id"])), []).append(r)
    for members in groups.values():
        tps = [float(r["throughput_img_s"]) for r in members]
        if len(tps) < 2:
            for r in members:
                r.setdefault("noisy", None)
            continue
        spread = (max(tps) - min(tps)) / statistics.median(tps) * 100
        for r in members:
            r["throughput_spread_pct"] = spread
            r["noisy"] = spread > limit_pct


def _fmt(v, fmt: str) -> str:
    return "-" if v is None or v != v else format(v, fmt)


def _eta(durations: list[float], remaining: int) -> str:
    if not durations:
        return "?"
    s = int(statistics.mean(durations) * remaining)
    return f"{s // 60}m{s % 60:02d}s"


def run_sweep(spec: SweepSpec, out_dir: Path, sweep_id: str, resume: bool = False,
              dry_run: bool = False, is_writer: bool = True, log: Log = print,
              argv: list[str] | None = None) -> Path:
    """Run every job of the grid; write the results folder (on the writing node).

    Args:
        spec: the grid.
        out_dir: the results folder.
        sweep_id: identifies this sweep in every row.
        resume: skip configurations whose run_id is already in runs.jsonl.
        dry_run: print each job's command and run nothing.
        is_writer: False on nodes other than the first of a multi-node sweep: they run
            their share of every job but record nothing.
        argv: the command line, for env.json.
    """
    from segcore.sweep.rows import append_row
    from segcore.host import capture_env
    from segcore.io import write_json_atomic

    jobs = expand(spec)
    if dry_run:
        for job in jobs:
            log(" ".join(_quote(c) for c in job_command(job, spec, out_dir, sweep_id)))
        log(f"{len(jobs)} job(s); --dry-run: nothing was run")
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    done = recorded_ids(out_dir) if resume else set()
    if not resume and is_writer and (out_dir / "runs.jsonl").exists():
        raise ConfigError(f"{out_dir} already holds results; pass --resume to continue "
                          "that sweep or --out to start a new one")
    if is_writer:
        env = capture_env(argv)
        env["sweep_id"] = sweep_id
        write_json_atomic(out_dir / "env.json", env)
    todo = [j for j in jobs if j.run_id not in done]
    if done:
        log(f"resume: {len(jobs) - len(todo)} configuration(s) already recorded, "
            f"{len(todo)} to run")
    durations: list[float] = []
    for i, job in enumerate(todo, 1):
        cmd = job_command(job, spec, out_dir, sweep_id)
        run_dir = out_dir / "runs" / job.run_id
        if run_dir.exists() and is_writer:
            shutil.rmtree(run_dir)  # a stale result from an interrupted attempt
        log(f"[{i}/{len(todo)}] start {job.run_id} ({job.workers * spec.nnodes} worker(s))"
            f"  eta {_eta(durations, len(todo) - i + 1)}")
        t0 = time.time()
        rc, timed_out = run_job(cmd, out_dir / "logs" / f"{job.run_id}.log", spec.timeout_s,
                                child_env())
        dt = time.time() - t0
        durations.append(dt)
        if not is_writer:
            continue
        result = run_dir / "result.json"
        if rc == 0 and result.is_file():
            row = json.loads(result.read_text())
            row["repeat"] = job.repeat
            if row.get("first_step_unix"):
                row["launch_overhead_s"] = row["first_step_unix"] - t0
        else:
            log_text = (out_dir / "logs" / f"{job.run_id}.log").read_text(errors="replace")
            status, error = classify_failure(rc, log_text, timed_out)
            row = failure_row(job, spec, sweep_id, status, error)
        row["wall_s"] = dt
        cfg_src = run_dir / "config.toml"
        if cfg_src.is_file():
            (out_dir / "configs").mkdir(exist_ok=True)
            shutil.copyfile(cfg_src, out_dir / "configs" / f"{job.run_id}.toml")
        append_row(out_dir, row)
        log(f"[{i}/{len(todo)}] {row['status']:7s} {job.run_id}  "
            f"{_fmt(row.get('throughput_img_s'), '.1f')} img/s  "
            f"p50 {_fmt(row.get('step_ms_p50'), '.0f')} ms  "
            f"mem {_fmt(row.get('peak_mem_mb'), '.0f')} MB  "
            f"mIoU {_fmt(row.get('mIoU'), '.3f')}  "
            f"launch {_fmt(row.get('launch_overhead_s'), '.1f')} s  ({dt:.0f} s)"
            + (f"  error: {row['error']}" if row["status"] != "ok" else ""))
    if is_writer:
        finish(out_dir, log)
    return out_dir


def finish(out_dir: Path, log: Log = print) -> None:
    """Speedup, noise flags, plots and report from the recorded rows."""
    from segcore.sweep import plots, report
    import pandas as pd

    from segcore.sweep.rows import read_records, write_rows

    rows = read_records(out_dir)
    if not rows:
        log("no rows recorded")
        return
    mark_noise(rows)
    df = plots.compute_speedup(pd.DataFrame(rows))
    for row, speedup, eff in zip(rows, df["speedup"], df["scaling_efficiency"]):
        row["speedup"], row["scaling_efficiency"] = speedup, eff  # NaN is written as null
    write_rows(out_dir, rows)
    ok = sum(r.get("status") == "ok" for r in rows)
    try:
        path = report.write_report(out_dir)  # draws the plots too
    except Exception as e:  # figures must never lose the table already written
        log(f"warning: report not written ({type(e).__name__}: {e}); the table is "
            f"complete, redraw with: python launch/plot.py {out_dir}")
        path = None
    log(f"{ok}/{len(rows)} configuration(s) ok; results in {out_dir}"
        + (f" (report: {path})" if path else ""))


def _quote(s: str) -> str:
    import shlex
    return shlex.quote(s)
