"""The sweep: expand a grid, run each configuration as a fresh torchrun job, record rows.

The sweep never trains in its own process. The driver resolves and validates every
configuration first (:mod:`segcore.sweep.grid`), writes each to ``configs/<run-id>.toml``
and starts one ``torchrun ... launch/train.py --config ...`` job per configuration
(:mod:`segcore.sweep.jobs`). The job writes its row to ``runs/<run-id>/result.json``; the
driver appends it to ``runs.jsonl``/``runs.csv`` atomically, or records a row with
status ``oom``, ``failed`` or ``timeout`` and the cause when the job dies.

One writer per results folder: the driver holds an exclusive lock on
``<out>/.sweep.lock`` for its lifetime, and its jobs inherit it, so a job orphaned by a
killed driver still holds it. The folder records its grid (``sweep.json``); ``--resume``
continues only the same grid, under the folder's sweep id.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import socket
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from segcore.config import ConfigError, dump_config, load_config
from segcore.faults import interruption, one_line
from segcore.fmt import fmt
from segcore.io import hold_folder
from segcore.sweep.grid import Job, SweepSpec, expand
from segcore.sweep.jobs import (EXIT_OUTPUT, child_env, classify_failure, config_path,
                                failure_row, job_command, run_job)

Log = Callable[[str], None]
LOCK = ".sweep.lock"
SPEC = "sweep.json"
PLAN = "plan.json"  # the writer node's plan for the other nodes of a multi-node sweep


class SweepInterrupted(Exception):
    """Ctrl-C or SIGTERM: rows already recorded are kept, the configuration in flight is
    recorded as ``interrupted``; the message says how to resume."""


class FolderBusy(ConfigError):
    """Another sweep (or its orphaned job) is writing this results folder."""


@contextlib.contextmanager
def writer_lock(out_dir: Path, argv: list[str]) -> Iterator[int]:
    """Hold the folder's writer lock; yields its file descriptor (for jobs to inherit).

    The lock is an advisory ``flock`` on the results folder itself, held on an open
    descriptor for the sweep's life: it vanishes with its holder (``kill -9`` included)
    and cannot be deleted away. ``.sweep.lock`` only names the holder, for the message.

    Raises:
        FolderBusy: the lock is held; the message names the holder and what to do.
    """
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK
    fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise
        except OSError:
            # A file system that cannot lock a folder (NFS maps flock to byte-range
            # locks, which need a file open for writing): the holder's file instead.
            os.close(fd)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = path.read_text(errors="replace").strip() or "unknown"
        except OSError:
            holder = "its note was deleted"
        os.close(fd)
        raise FolderBusy(f"{out_dir} is being written by another sweep ({holder}); wait "
                         "for it to finish, or choose another --out") from None
    try:
        with contextlib.suppress(OSError):  # the note is for people; the lock is the fd
            path.write_text(f"pid {os.getpid()} on {socket.gethostname()} since "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(argv)}")
        with hold_folder(fd):
            yield fd
    finally:
        os.close(fd)  # closing releases the lock (jobs that inherited it keep theirs)


def check_resume_spec(out_dir: Path, spec: SweepSpec) -> str:
    """The folder's sweep id, when its recorded grid equals ``spec``.

    Raises:
        ConfigError: no recorded grid, or a different one (the differences listed).
    """
    path = out_dir / SPEC
    if not path.is_file():
        raise ConfigError(f"--resume: {out_dir} holds no {SPEC}, so it is not a sweep this "
                          "version can continue; start a new sweep with another --out")
    saved = json.loads(path.read_text())
    old, new = saved.get("spec", {}), json.loads(json.dumps(spec.to_dict()))
    # A field an older version did not record had its default then.
    defaults = json.loads(json.dumps(SweepSpec.defaults()))
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
    diffs = [f"{k}: recorded {old.get(k)!r}, now {new.get(k)!r}"
             for k in sorted(set(old) | set(new))
             if k not in SweepSpec.TRANSPORT and old.get(k) != new.get(k)]
    now, then = data_fingerprint(spec), saved.get("data")
    if then is not None and now is not None and now != then:
        raise ConfigError(
            f"--resume: the dataset {spec.data} changed since this sweep started "
            f"(fingerprint {then['data_fingerprint']} of {then['data_pairs']} pairs, now "
            f"{now['data_fingerprint']} of {now['data_pairs']}): its rows would mix two "
            "datasets. Start a new sweep with another --out, or restore the data")
    if diffs:
        raise ConfigError(f"--resume: the flags describe another grid than {out_dir} holds: "
                          + "; ".join(diffs) + ". Resume with the original flags, or start "
                          "a new sweep with another --out")
    return saved["sweep_id"]


def _attempt(spec: SweepSpec) -> str:
    """What the nodes of one launch share and a later launch does not: the rendezvous
    endpoint (a port per Slurm job) and the scheduler's job id."""
    return f"{spec.rdzv_endpoint}|{os.environ.get('SLURM_JOB_ID', '')}"


def _publish_plan(out_dir: Path, spec: SweepSpec, sweep_id: str, todo: list[Job]) -> None:
    """The writer node's plan for the other nodes: every configuration file first, then
    ``plan.json`` (this launch, the folder's sweep id, the run ids to run in order)."""
    from segcore.io import write_json_atomic

    for job in todo:
        dump_config(job.config, config_path(out_dir, job.run_id))
    write_json_atomic(out_dir / PLAN, {"attempt": _attempt(spec), "sweep_id": sweep_id,
                                       "run_ids": [j.run_id for j in todo],
                                       "written_unix": time.time()})


def _read_plan(out_dir: Path, spec: SweepSpec, log: Log,
               poll_s: float = 1.0) -> dict[str, Any]:
    """Wait for the writer node's plan of this launch (within the job timeout)."""
    started, attempt = time.time(), _attempt(spec)
    deadline = started + max(60.0, spec.timeout_s)
    said = False
    while time.time() < deadline:
        try:
            plan = json.loads((out_dir / PLAN).read_text())
            # This launch's, not an earlier one's: under Slurm the job id says so; without
            # it, a plan written before this node started (10 minutes of skew allowed)
            # is an earlier launch's.
            fresh = bool(os.environ.get("SLURM_JOB_ID")) or \
                plan.get("written_unix", 0) > started - 600
            if plan.get("attempt") == attempt and fresh and isinstance(
                    plan.get("run_ids"), list) and plan.get("sweep_id"):
                log(f"plan from the writer node: {len(plan['run_ids'])} configuration(s), "
                    f"sweep {plan['sweep_id']}")
                return plan
        except (OSError, ValueError):
            pass
        if not said:
            log(f"waiting for the writer node's plan ({out_dir / PLAN})")
            said = True
        time.sleep(poll_s)
    raise ConfigError(f"no plan from the writer node in {out_dir / PLAN} after "
                      f"{deadline - started:.0f} s: --out must be on a file system every node "
                      "shares, and node 0 must run the same sweep command")


def data_fingerprint(spec: SweepSpec) -> dict[str, Any] | None:
    """The sweep's dataset fingerprint (names and sizes, no decode); ``None`` for the
    built-in synthetic scenes, which the code makes the same every time."""
    from segcore.data.layouts import DatasetError, discover

    if spec.data == "synthetic":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the jobs report the files they skip
            return discover(spec.data).fingerprint()
    except (DatasetError, OSError) as e:
        raise ConfigError(f"--data {spec.data}: {e}") from None


def recorded_ids(out_dir: Path) -> set[str]:
    """The run ids a resume skips: every recorded row except those that failed for a
    reason of the environment, not of the configuration (``rerun_on_resume``:
    interrupted by Ctrl-C or SIGTERM, or out of disk space), which run again."""
    from segcore.results.rows import read_records

    return {r.get("run_id") for r in read_records(out_dir) if not r.get("rerun_on_resume")}


def _eta(durations: list[float], remaining: int) -> str:
    if not durations:
        return "?"
    s = int(statistics.mean(durations) * remaining)
    return f"{s // 60}m{s % 60:02d}s"


def host_device() -> tuple[str, str]:
    """(device type, device name) of this host, for rows of jobs that died."""
    import torch

    from segcore.host import cpu_model

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name(0)
    return "cpu", cpu_model()


def plan_warnings(jobs: list[Job], spec: SweepSpec) -> list[str]:
    """What the hardware does not allow, said before anything runs: oversubscribed
    worker counts and emulated precisions."""
    import torch

    from segcore.host import oversubscription, usable_cores
    from segcore.precision import native_precision

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = "cuda" if gpus else "cpu"
    out = []
    for w in sorted({j.workers for j in jobs}):
        threads = spec.threads or max(1, usable_cores() // w)
        why = oversubscription(w, 1 if gpus else threads, gpus)
        if why:
            out.append(f"warning: {w}-worker jobs are oversubscribed ({why}); their rows "
                       "are flagged and their speedup is not a scaling result")
    for p in sorted({j.config.train.precision for j in jobs}):
        native, why = native_precision(p, device)
        if not native:
            out.append(f"warning: {p} is emulated here ({why}); its rows are flagged")
    return out


def workload_lines(jobs: list[Job]) -> list[str]:
    """One line per distinct workload of the grid (what --dry-run shows)."""
    seen: dict[tuple, int] = {}
    for j in jobs:
        m, d, t = j.config.model, j.config.data, j.config.train
        key = (m.arch, m.widths, d.image_size, t.per_worker_batch, t.precision, d.loader,
               m.channels_last, m.compile, j.config.mode, t.engine, t.zero_stage)
        seen[key] = seen.get(key, 0) + 1
    out = []
    for (arch, widths, size, batch, prec, loader, cl, comp, mode, eng, z), n in seen.items():
        out.append(f"workload: {arch} U-Net widths {'-'.join(map(str, widths))}, {size} px "
                   f"crops, batch {batch}/worker, {prec}, "
                   f"{'channels-last' if cl else 'NCHW'}, {'compiled' if comp else 'eager'}, "
                   f"{loader} loader, {eng}" + (f" ZeRO-{z}" if eng == "deepspeed" else "")
                   + f", mode {mode} ({n} job(s))")
    return out


def run_sweep(spec: SweepSpec, out_dir: Path, sweep_id: str, resume: bool = False,
              dry_run: bool = False, is_writer: bool = True, log: Log = print,
              argv: list[str] | None = None) -> Path:
    """Run every job of the grid; write the results folder (on the writing node).

    Args:
        spec: the grid.
        out_dir: the results folder.
        sweep_id: identifies this sweep in every row (on ``resume``, the folder's own id
            is kept instead).
        resume: continue the folder's sweep: skip configurations already recorded.
        dry_run: print each job's command and the plan's warnings, and write the
            configuration files the commands name (``configs/<run-id>.toml``, so that each
            command can be run by hand); run nothing, record nothing, and leave a folder
            that already holds results untouched.
        is_writer: False on nodes other than the first of a multi-node sweep: they run
            their share of every job but record nothing.
        argv: the command line, for env.json.

    Raises:
        ConfigError: a bad configuration (before any job starts), a folder that holds
            another grid or is written by another sweep.
        SweepInterrupted: Ctrl-C; the rows recorded so far and a partial report are kept.
    """
    argv = list(argv or [])
    jobs = expand(spec, sweep_id, out_dir)
    if dry_run:
        for line in workload_lines(jobs):
            log(line)
        for line in plan_warnings(jobs, spec):
            log(line)
        holds_results = (out_dir / "runs.jsonl").exists() or (out_dir / SPEC).exists()
        for job in jobs:
            if not holds_results:
                dump_config(job.config, config_path(out_dir, job.run_id))
            log(shlex.join(job_command(job, out_dir, sweep_id, spec.nnodes,
                                       spec.rdzv_endpoint)))
        wrote = (f"{out_dir} holds results: its configs were left as they are" if
                 holds_results else f"configs written to {out_dir / 'configs'}")
        log(f"{len(jobs)} job(s); --dry-run: nothing was run ({wrote})")
        return out_dir
    if not is_writer:
        # The plan (sweep id, configurations to run, in order) comes from the writer
        # node only; this node writes nothing into the results folder.
        plan = _read_plan(out_dir, spec, log)
        planned = []
        for rid in plan["run_ids"]:  # the writer's configuration files, not our own grid
            cfg = load_config(config_path(out_dir, rid))
            planned.append(Job(rid, max(1, cfg.train.world_size // spec.nnodes), cfg))
        _run_jobs(planned, spec, out_dir, plan["sweep_id"], set(), None, False, log)
        return out_dir
    with writer_lock(out_dir, argv) as lock_fd:
        if resume:
            sweep_id = check_resume_spec(out_dir, spec)
            jobs = expand(spec, sweep_id, out_dir)  # the folder's id in configs and rows
            done = recorded_ids(out_dir)
        else:
            if (out_dir / "runs.jsonl").exists() or (out_dir / SPEC).exists():
                raise ConfigError(f"{out_dir} already holds results; pass --resume to "
                                  "continue that sweep or --out to start a new one")
            done = set()
        _record_start(out_dir, spec, sweep_id, argv, resume)
        _publish_plan(out_dir, spec, sweep_id, [j for j in jobs if j.run_id not in done])
        for line in plan_warnings(jobs, spec):
            log(line)
        _measure_interconnect(out_dir, spec, jobs, log)
        try:
            unwritten = _run_jobs(jobs, spec, out_dir, sweep_id, done, lock_fd, True, log)
        except KeyboardInterrupt as e:
            finish(out_dir, log)
            raise SweepInterrupted(
                f"interrupted ({interruption(e)}): the rows recorded in {out_dir} are kept "
                f"(partial report written); continue with: "
                f"{_resume_command(argv, out_dir)}") from None
        finish(out_dir, log)
        if unwritten:
            raise ConfigError(f"{len(unwritten)} row(s) could not be written to {out_dir} "
                              f"({', '.join(unwritten)}); they are kept in "
                              f"{_fallback_rows(out_dir)}. Make the folder writable, then "
                              f"continue with: {_resume_command(argv, out_dir)}")
    return out_dir


def _measure_interconnect(out_dir: Path, spec: SweepSpec, jobs: list[Job], log: Log) -> None:
    """commbench.json once per sweep folder (a few seconds): the scaling model's
    interconnect. Telemetry: a failure is one warning line, never a lost sweep; the file
    then says why, and a resumed sweep measures again."""
    from segcore.scaling.comm import (COMMBENCH_FILE, CommbenchError, commbench_for_sweep,
                                      load_commbench)

    path = out_dir / COMMBENCH_FILE
    if path.exists():
        try:
            if "failed" not in load_commbench(path):
                return
        except (OSError, ValueError):
            pass  # unreadable: measure again
    log(f"measuring the interconnect: collectives over {max(spec.workers)} worker(s) "
        f"(a few seconds) -> {COMMBENCH_FILE}")
    try:
        commbench_for_sweep(out_dir, max(spec.workers),
                            [(j.config.model.arch, j.config.model.widths,
                              j.config.data.class_scheme) for j in jobs])
    except CommbenchError as e:
        log(f"warning: interconnect not measured ({e}); the sweep goes on, and the "
            "report's scaling model says so")
    except Exception as e:  # telemetry: never a lost sweep
        log(f"warning: interconnect not measured ({type(e).__name__}: {one_line(e)}); "
            "the sweep goes on, and the report's scaling model says so")


def _resume_command(argv: list[str], out_dir: Path) -> str:
    args = [a for a in argv[1:] if a != "--resume"]
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(out_dir)]
    return shlex.join(["python", argv[0] if argv else "launch/sweep.py", *args, "--resume"])


def _record_start(out_dir: Path, spec: SweepSpec, sweep_id: str, argv: list[str],
                  resume: bool) -> None:
    """sweep.json (the grid, once) and env.json (every command that wrote here)."""
    from segcore.host import capture_env
    from segcore.io import write_json_atomic

    if not resume:
        write_json_atomic(out_dir / SPEC, {"sweep_id": sweep_id, "spec": spec.to_dict(),
                                           "data": data_fingerprint(spec)})
    env_path = out_dir / "env.json"
    commands: list[dict[str, Any]] = []
    if env_path.is_file():
        with contextlib.suppress(ValueError, OSError):
            commands = json.loads(env_path.read_text()).get("commands", [])
    env = capture_env(argv)
    env["sweep_id"] = sweep_id
    env["commands"] = commands + [{"at": env["timestamp_utc"], "argv": env["argv"],
                                   "resume": resume}]
    write_json_atomic(env_path, env)


def _fallback_rows(out_dir: Path) -> Path:
    """Where rows go that the results folder would not take (it became read-only)."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"segbench-unwritten-{out_dir.resolve().name}.jsonl"


def _record(out_dir: Path, row: dict[str, Any], again: bool, unwritten: list[str],
            log: Log) -> None:
    """Append the row (replacing an earlier environmental failure of the same run). A
    full disk stops the sweep; a folder that will not take it (read-only, immutable)
    keeps the row in a fallback file and the sweep goes on."""
    from segcore.io import dumps
    from segcore.results.rows import append_row, replace_row

    try:
        (replace_row if again else append_row)(out_dir, row)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConfigError(f"no space left on the device writing {out_dir}: the rows "
                              f"recorded before {row['run_id']} are kept; free space and "
                              "continue with --resume") from None
        fallback = _fallback_rows(out_dir)
        with open(fallback, "a", encoding="utf-8") as f:
            f.write(dumps(row) + "\n")
        unwritten.append(str(row["run_id"]))
        log(f"error: the row of {row['run_id']} could not be written to {out_dir} "
            f"({e.strerror or e}); kept in {fallback}; the sweep goes on")


def _run_jobs(jobs: list[Job], spec: SweepSpec, out_dir: Path, sweep_id: str,
              done: set[str], lock_fd: int | None, is_writer: bool, log: Log) -> list[str]:
    """Run the jobs not in ``done``; the run ids whose rows the folder would not take."""
    from segcore.results.rows import read_records

    todo = [j for j in jobs if j.run_id not in done]
    again = {r.get("run_id") for r in read_records(out_dir)} - done if is_writer else set()
    unwritten: list[str] = []
    if done or again:
        rerun = sum(j.run_id in again for j in todo)
        log(f"resume: {len(jobs) - len(todo)} configuration(s) already recorded, "
            f"{len(todo)} to run"
            + (f" ({rerun} again: interrupted or out of disk space before)" if rerun else ""))
    dev_type, dev_name = host_device()
    durations: list[float] = []
    for i, job in enumerate(todo, 1):
        run_dir = out_dir / "runs" / job.run_id
        if is_writer and run_dir.exists():
            shutil.rmtree(run_dir)  # a stale result from an interrupted attempt
        log(f"[{i}/{len(todo)}] start {job.run_id} ({job.workers * spec.nnodes} worker(s))"
            f"  eta {_eta(durations, len(todo) - i + 1)}")
        t0 = time.time()
        cmd = job_command(job, out_dir, sweep_id, spec.nnodes, spec.rdzv_endpoint)
        log_path = out_dir / "logs" / (f"{job.run_id}.log" if is_writer
                                       else f"{job.run_id}.node{_node_rank()}.log")
        try:
            rc, timed_out = run_job(cmd, log_path, spec.timeout_s, child_env(),
                                    keep_fds=(lock_fd,) if lock_fd is not None else ())
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the job in flight gets a row
            if is_writer:
                row = failure_row(job, sweep_id, "interrupted",
                                  f"stopped by {interruption(e)} while running; --resume "
                                  "runs it again", spec.nnodes, dev_type, dev_name)
                row["rerun_on_resume"] = True
                _record(out_dir, row, job.run_id in again, unwritten, log)
            raise
        dt = time.time() - t0
        durations.append(dt)
        if not is_writer:
            continue
        row = _job_row(job, rc, timed_out, run_dir, log_path, sweep_id, spec.nnodes,
                       dev_type, dev_name, t0)
        row["wall_s"] = dt
        row.update(spec.row_extra)
        if spec.preset_rows is not None:  # a named session of the reference study
            from segcore.results.study import session_of

            row.setdefault("session", session_of(job.run_id))
        if rc == EXIT_OUTPUT or "no space left" in str(row.get("error", "")).lower():
            row["rerun_on_resume"] = True  # the environment's fault: resume runs it again
        _record(out_dir, row, job.run_id in again, unwritten, log)
        log(f"[{i}/{len(todo)}] {row['status']:7s} {job.run_id}  "
            f"{fmt(row.get('throughput_img_s'), '.1f')} img/s "
            f"(+/-{fmt(row.get('throughput_ci95_pct'), '.0f')} %, "
            f"{row.get('measured_steps', '-')} steps; wall "
            f"{fmt(row.get('wall_throughput_img_s'), '.1f')} img/s, "
            f"{fmt(_pct(row.get('measured_time_share')), '.0f')} % measured)  "
            f"p50 {fmt(row.get('step_ms_p50'), '.0f')} ms  "
            f"mem {fmt(row.get('mem_workload_mb', row.get('peak_mem_mb')), '.0f')} MiB  "
            f"mIoU {fmt(row.get('mIoU'), '.3f')}  "
            f"launch {fmt(row.get('launch_overhead_s'), '.1f')} s  ({dt:.0f} s)"
            + (f"  error: {row['error']}" if row["status"] != "ok" else ""))
    return unwritten


def _pct(share: Any) -> float | None:
    return None if share is None else float(share) * 100


def _node_rank() -> str:
    return os.environ.get("SLURM_NODEID", os.environ.get("GROUP_RANK", "x"))


def _job_row(job: Job, rc: int, timed_out: bool, run_dir: Path, log_path: Path,
             sweep_id: str, nnodes: int, dev_type: str, dev_name: str,
             t0: float) -> dict[str, Any]:
    """The job's own row when it wrote one that names this job; else a failure row."""
    result = run_dir / "result.json"
    if rc == 0 and result.is_file():
        try:
            row = json.loads(result.read_text())
        except (ValueError, OSError) as e:
            row = {"run_id": None, "error": f"result.json unreadable: {e}"}
        if row.get("run_id") == job.run_id and row.get("sweep_id") == sweep_id:
            row["repeat"] = job.repeat
            row.update(job.axis_columns())
            if row.get("first_step_unix"):
                row["launch_overhead_s"] = row["first_step_unix"] - t0
            return row
        return failure_row(job, sweep_id, "failed",
                           f"{result} names run {row.get('run_id')!r} of sweep "
                           f"{row.get('sweep_id')!r}, not this job: not recorded",
                           nnodes, dev_type, dev_name)
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    status, error = classify_failure(rc, text, timed_out)
    return failure_row(job, sweep_id, status, error, nnodes, dev_type, dev_name)


def finish(out_dir: Path, log: Log = print) -> None:
    """Derived columns (speedup, confidence flags), plots and report from the rows."""
    from segcore.results import analysis, report
    from segcore.results.rows import read_records, write_rows

    rows = read_records(out_dir)
    if not rows:
        log("no rows recorded")
        return
    rows = analysis.annotate(rows)
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
