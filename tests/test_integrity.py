"""Results integrity under faults: one writer per folder, honest resume, every fault a row.

Each test checks that no row is lost, duplicated or attributed to the wrong run.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segcore.config import ConfigError
from segcore.sweep.jobs import child_env
from segcore.results.rows import read_records

ROOT = Path(__file__).resolve().parents[1]
SWEEP = str(ROOT / "launch" / "sweep.py")
TRAIN = str(ROOT / "launch" / "train.py")
TINY = ["--image-size", "32", "--depths", "2", "--epochs", "1", "--warmup-steps", "1",
        "--measure-steps", "4", "--train-arg=--synthetic-images=24"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return child_env({"SEGBENCH_CACHE": str(tmp_path_factory.mktemp("cache")),
                      "SEGBENCH_DIE_WITH_PARENT": "0"})


def start_sweep(args, env):
    return subprocess.Popen([sys.executable, SWEEP, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(cmd, env, timeout=300):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def wait_for(pred, timeout=120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.2)
    return False


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().split()[2]
        except OSError:
            continue
        if text in cmd and state != "Z":
            pids.append(int(d.name))
    return pids


def check_rows(out: Path, n: int, sweep_id: str | None = None) -> list[dict]:
    rows = read_records(out)
    ids = [r["run_id"] for r in rows]
    assert len(ids) == len(set(ids)) == n, ids
    if sweep_id is not None:
        assert {r["sweep_id"] for r in rows} == {sweep_id}
    return rows


# slow: the lock itself is tested in-process (test_the_writer_lock_cannot_be_deleted_away,
# test_sweep.py::test_one_writer_per_folder)
@pytest.mark.slow
@pytest.mark.multiproc
def test_a_second_writer_is_refused_while_a_sweep_runs(tmp_path, env):
    out = tmp_path / "s"
    args = ["--gpus", "1", "--batch-sizes", "2", *TINY, "--measure-steps", "150",
            "--out", str(out), "--sweep-id", "first"]  # a job long enough to be caught
    first = start_sweep(args, env)
    try:
        assert wait_for(lambda: (out / "configs").is_dir()), first.communicate()
        second = run([sys.executable, SWEEP, *args[:-2], "--sweep-id", "second"], env)
        assert second.returncode == 2
        assert "being written by another sweep (pid" in second.stderr
        resumed = run([sys.executable, SWEEP, *args, "--resume"], env)
        assert resumed.returncode == 2 and "another sweep" in resumed.stderr
        assert "Traceback" not in second.stderr + resumed.stderr
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stdout[-2000:] + stderr[-2000:]
    check_rows(out, 1, "first")


# slow: in CI the subreaper test kills the driver the same way, and the SIGTERM test
# resumes a sweep to its end
@pytest.mark.slow
@pytest.mark.multiproc
def test_kill_9_of_the_driver_takes_its_job_along_and_resume_completes(tmp_path, env):
    out = tmp_path / "k"
    args = ["--gpus", "1", "--batch-sizes", "2", "--image-size", "32", "--depths", "2",
            "--epochs", "1", "--warmup-steps", "1", "--measure-steps", "300",
            "--train-arg=--synthetic-images=24", "--out", str(out)]
    e = dict(env, SEGBENCH_DIE_WITH_PARENT="1")
    driver = start_sweep(args + ["--sweep-id", "killed"], e)
    logs = out / "logs"
    assert wait_for(lambda: logs.is_dir() and any(
        "data:" in p.read_text(errors="replace") for p in logs.glob("*.log"))), \
        driver.communicate()
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # The torchrun agent and its worker die with the driver: no orphan keeps training
    # (and keeps writing into the folder a resume is about to use).
    assert wait_for(lambda: not processes_mentioning("--sweep-id killed"), 30), \
        processes_mentioning("--sweep-id killed")
    assert read_records(out) == []
    # Another grid is refused, naming what differs ...
    other = run([sys.executable, SWEEP, *args, "--resume", "--image-size", "64"], e)
    assert other.returncode == 2 and "image_size: recorded 32, now 64" in other.stderr
    # ... the same grid completes, under the folder's own sweep id.
    res = run([sys.executable, SWEEP, *args, "--sweep-id", "new", "--resume"], e)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (row,) = check_rows(out, 1, "killed")
    assert row["status"] == "ok" and row["measured_steps"] == 300
    commands = json.loads((out / "env.json").read_text())["commands"]
    assert [c["resume"] for c in commands] == [False, True]


# Slow (11 s): OOM exit 3 (test_cpu_allocator_failure...) and a failing rank (test_distributed) run in CI.
@pytest.mark.slow
@pytest.mark.multiproc
def test_oom_and_killed_rank_become_oom_rows(tmp_path, env):
    out = tmp_path / "o"
    e = dict(env, SEGBENCH_FAULT="1:2:kill")
    p = run([sys.executable, SWEEP, "--gpus", "2", "--batch-sizes", "2", *TINY,
             "--out", str(out)], e)
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = check_rows(out, 1)
    assert row["status"] == "oom", row
    assert "rank 1 was killed (SIGKILL), likely out of memory" in row["error"]
    assert row["world_size"] == 2 and row["batch_size"] == 2 and row["params"] > 0


def test_cpu_allocator_failure_is_exit_3_with_one_line(tmp_path, env):
    e = dict(env, SEGBENCH_FAULT="0:2:oom")
    p = run([sys.executable, TRAIN, "--image-size", "32", "--widths", "8,16",
             "--synthetic-images", "24", "--mode", "throughput", "--steps", "3",
             "--out", str(tmp_path / "r")], e)
    assert p.returncode == 3, p.stderr[-2000:]
    assert "error: out of memory: DefaultCPUAllocator: can't allocate memory" in p.stderr
    assert "Traceback" not in p.stderr


# Slow (18 s): --resume with the saved configuration runs in CI in gpu_check's compile step and test_trainer.
@pytest.mark.slow
def test_train_resume_continues_the_saved_configuration(tmp_path, env):
    out = tmp_path / "r"
    base = [sys.executable, TRAIN, "--image-size", "64", "--widths", "8,16",
            "--synthetic-images", "24", "--batch-size", "2", "--mode", "accuracy",
            "--out", str(out)]
    p = run(base + ["--epochs", "1"], env)
    assert p.returncode == 0, p.stderr[-2000:]
    cfg_before = (out / "config.toml").read_text()
    # Another batch size contradicts the run being resumed: refused by name, nothing
    # in the folder rewritten.
    p = run([sys.executable, TRAIN, "--resume", "--out", str(out), "--batch-size", "8"], env)
    assert p.returncode == 2 and "train.local_batch_size: saved 2, asked 8" in p.stderr
    assert (out / "config.toml").read_text() == cfg_before
    # Only --out (and a longer budget): the saved configuration continues.
    p = run([sys.executable, TRAIN, "--resume", "--out", str(out), "--epochs", "2"], env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resuming" in p.stdout and "epoch 2/2" in p.stdout
    assert 'image_size = 64' in (out / "config.toml").read_text()
    row = json.loads((out / "result.json").read_text())
    assert row["image_size"] == 64 and row["batch_size"] == 2 and row["epochs"] == 2
    # A truncated last.pt: resume falls back to the best checkpoint, and says so.
    (out / "last.pt").write_bytes(b"")
    p = run([sys.executable, TRAIN, "--resume", "--out", str(out), "--epochs", "3"], env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "last.pt cannot be read" in p.stdout and "checkpoint.pt instead" in p.stdout
    # Both damaged: one line naming the files.
    (out / "last.pt").write_bytes(b"")
    (out / "checkpoint.pt").write_bytes(b"\x80junk")
    p = run([sys.executable, TRAIN, "--resume", "--out", str(out)], env)
    assert p.returncode == 2 and "no usable checkpoint" in p.stderr
    assert "last.pt" in p.stderr and "checkpoint.pt" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("argv,words", [
    (["--out", "FILE"], "is a file"),
    (["--config", "BADTOML"], "is not valid TOML"),
    (["--config", "WIDTHS"], "model.widths = '16,32' must be a list of whole numbers"),
    (["--config", "HALFBATCH"], "train.local_batch_size = 2.5 must be a whole number"),
    (["--lr", "inf"], "train.lr = inf must be a finite number"),
    (["--target-miou", "2"], "train.target_miou = 2.0 must be a number from 0 to 1"),
    (["--image-size", "4096", "--synthetic-images", "6"], "larger than every training image"),
])
def test_bad_input_is_one_line_not_a_traceback(tmp_path, env, argv, words):
    files = {"FILE": ("f.txt", "x"), "BADTOML": ("bad.toml", "[model\narch = 1"),
             "WIDTHS": ("w.toml", '[model]\nwidths = "16,32"\n'),
             "HALFBATCH": ("h.toml", "[train]\nlocal_batch_size = 2.5\n")}
    args = []
    for a in argv:
        if a in files:
            name, text = files[a]
            (tmp_path / name).write_text(text)
            a = str(tmp_path / name)
        args.append(a)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    p = run([sys.executable, TRAIN, "--widths", "8,16", "--mode", "throughput", "--steps", "1",
             *args], env, timeout=120)
    assert p.returncode == 2, p.stdout[-1000:] + p.stderr[-2000:]
    assert words in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "config.toml").exists()


def test_sweep_out_is_a_file_and_resume_without_out(tmp_path, env):
    f = tmp_path / "f.txt"
    f.write_text("x")
    p = run([sys.executable, SWEEP, "--gpus", "1", "--out", str(f)], env)
    assert p.returncode == 2 and "is a file" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, SWEEP, "--resume"], env=env, capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "no sweep folder under runs/sweeps" in p.stderr


def fake_job(cmd, log_path, timeout_s, env, keep_fds=()):
    """A job that writes an ok row at once (for the driver's recording paths)."""
    out = Path(cmd[cmd.index("--out") + 1])
    out.mkdir(parents=True)
    rid, sid = cmd[cmd.index("--run-id") + 1], cmd[cmd.index("--sweep-id") + 1]
    (out / "result.json").write_text(json.dumps(
        {"run_id": rid, "sweep_id": sid, "status": "ok", "throughput_img_s": 1.0}))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("ok")
    return 0, False


def test_full_disk_is_one_line_and_keeps_the_rows_written(tmp_path, monkeypatch):
    """ENOSPC while recording the second row: the first row stays, the error says how to
    continue, and no temp file is left behind."""
    from segcore.sweep import driver
    from segcore.results import rows as rows_mod
    from segcore.sweep.grid import SweepSpec

    spec = SweepSpec(workers=[1], batch_sizes=[2, 4], depths=[2], engines=["ddp"],
                     loaders=["torch"], precisions=["fp32"], channels_last=[True],
                     image_size=32)

    real_write = rows_mod.write_bytes_atomic  # runs.jsonl is appended as bytes
    calls = []

    def full_disk(path, data):
        if Path(path).name == "runs.jsonl":
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    monkeypatch.setattr(driver, "run_job", fake_job)
    monkeypatch.setattr(rows_mod, "write_bytes_atomic", full_disk)
    with pytest.raises(ConfigError, match="no space left.*rows recorded before .* kept"):
        driver.run_sweep(spec, tmp_path / "s", "sid", log=lambda m: None, argv=["x"])
    assert [r["run_id"] for r in read_records(tmp_path / "s")] == ["w1-six-u1632-b2-ddp-torch-fp32-cl"]
    assert not list((tmp_path / "s").glob(".*.tmp"))


def test_checkpoint_write_failure_leaves_the_old_one_and_no_temp_file(tmp_path, monkeypatch):
    import torch

    from segcore.train import checkpoint

    path = tmp_path / "last.pt"
    state = {"config": {}, "engine": {"model": {"w": torch.ones(2)}}}
    checkpoint.save_checkpoint(state, path)

    def no_space(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint({"config": {}, "engine": {"model": {}}}, path)
    assert checkpoint.load_checkpoint(path)["engine"]["model"]["w"].sum() == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_help_and_unknown_flags_exit_cleanly(env):
    ok = run([sys.executable, TRAIN, "--help"], env, timeout=120)
    assert ok.returncode == 0 and "--measure-steps" in ok.stdout and not ok.stderr
    bad = run([sys.executable, TRAIN, "--bogus"], env, timeout=120)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_line_torn_inside_a_multibyte_character_is_one_bad_line(tmp_path):
    from segcore.results.rows import append_row

    good = json.dumps({"run_id": "a", "status": "ok", "error": "caf\u00e9"}, ensure_ascii=False)
    torn = '{"run_id": "b", "error": "caf\u00e9'.encode("utf-8")[:-1]  # cut inside "é"
    (tmp_path / "runs.jsonl").write_bytes(good.encode("utf-8") + b"\n" + torn)
    with pytest.warns(UserWarning, match="runs.jsonl:2: skipping"):
        assert [r["run_id"] for r in read_records(tmp_path)] == ["a"]
    append_row(tmp_path, {"run_id": "c", "status": "ok"})  # resume appends after it
    with pytest.warns(UserWarning):
        assert [r["run_id"] for r in read_records(tmp_path)] == ["a", "c"]


def test_the_writer_lock_cannot_be_deleted_away(tmp_path):
    from segcore.sweep.driver import FolderBusy, writer_lock

    with writer_lock(tmp_path, ["sweep", "--out", "x"]):
        (tmp_path / ".sweep.lock").unlink()  # an operator "cleaning up"
        with pytest.raises(FolderBusy, match="another sweep"):
            with writer_lock(tmp_path, ["second"]):
                pass
    with writer_lock(tmp_path, ["third"]):  # released with its holder
        pass


@pytest.mark.parametrize("argv,words", [
    (["--timeout", "0"], "--timeout 0: a job needs a time limit above 0"),
    (["--timeout", "-5"], "--timeout -5"),
    (["--data", "/nonexistent/sdd"], "--data /nonexistent/sdd: no such folder"),
])
def test_sweep_inputs_checked_before_the_first_job(tmp_path, capsys, argv, words):
    import importlib

    sweep_cli = importlib.import_module("launch.sweep")
    rc = sweep_cli.main(["--gpus", "1", "--out", str(tmp_path / "s"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_a_non_finite_loss_stops_the_run_as_diverged(tmp_path, env):
    """--lr 1e6: the loss overflows within a few steps; the run stops with status
    diverged (the step, the last finite loss), exit 5, and no checkpoint of it."""
    out = tmp_path / "run"
    p = run([sys.executable, TRAIN, "--widths", "8,16", "--image-size", "32",
             "--synthetic-images", "24", "--batch-size", "4", "--epochs", "3", "--lr", "1e6",
             "--mode", "accuracy", "--out", str(out)], env)
    assert p.returncode == 5, p.stderr[-2000:]
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert err[-1].startswith("error: diverged: the training loss is not finite by step")
    assert "Traceback" not in p.stderr and "done:" not in p.stdout
    row = json.loads((out / "result.json").read_text())
    assert row["status"] == "diverged" and row["diverged_step"] <= 5
    assert row["last_finite_loss"] is None or math.isfinite(row["last_finite_loss"])
    assert not (out / "checkpoint.pt").exists() and not (out / "last.pt").exists()


def test_a_diverged_job_is_a_diverged_row():
    from segcore.sweep.jobs import classify_failure

    log = "epoch 1/3\n[rank 0] error: diverged: the training loss is not finite by step 4\n"
    status, error = classify_failure(5, log, False)
    assert status == "diverged" and error.startswith("diverged: the training loss")


def _wait_for(proc, path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}")
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not seen in {path}")


def _sigterm_when(argv: list[str], env, console: Path, watched: Path,
                  text: str) -> tuple[int, str]:
    """Start ``argv`` (output to ``console``), send SIGTERM once ``watched`` shows
    ``text``; (exit code, console output)."""
    with open(console, "w") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_for(proc, watched, text)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return rc, console.read_text()


@pytest.mark.multiproc
def test_sigterm_to_a_sweep_records_the_job_in_flight_and_resume_finishes(tmp_path, env):
    """scancel / a time limit / preemption send SIGTERM: handled as Ctrl-C, and the
    configuration in flight gets an `interrupted` row that --resume runs again."""
    out = tmp_path / "s"
    args = [SWEEP, "--gpus", "1", "--batch-sizes", "2", *TINY, "--out", str(out)]
    run_id = "w1-six-u1632-b2-ddp-torch-fp32-cl"
    # the job is training once its log shows the data line
    rc, text = _sigterm_when([sys.executable, *args], env, tmp_path / "console.txt",
                             out / "logs" / f"{run_id}.log", "data: ")
    assert rc == 130, text[-2000:]
    assert "interrupted (SIGTERM)" in text and "--resume" in text and "Traceback" not in text
    rows = read_records(out)
    assert [(r["run_id"], r["status"]) for r in rows] == [(run_id, "interrupted")]
    assert rows[0]["rerun_on_resume"] and "SIGTERM" in rows[0]["error"]
    assert (out / "report.md").is_file()
    p = run([sys.executable, *args, "--resume"], env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "1 to run (1 again" in p.stdout
    rows = read_records(out)
    assert [(r["run_id"], r["status"]) for r in rows] == [(run_id, "ok")]


@pytest.mark.slow  # in CI: the Slurm template's SIGTERM test stops train.py the same way
def test_sigterm_to_train_py_is_ctrl_c_with_a_row_and_the_resume_command(tmp_path, env):
    out = tmp_path / "run"
    argv = [sys.executable, TRAIN, "--widths", "8,16", "--image-size", "32",
            "--synthetic-images", "24", "--batch-size", "2", "--epochs", "50", "--mode",
            "accuracy", "--out", str(out)]
    log = tmp_path / "log.txt"
    rc, text = _sigterm_when(argv, env, log, log, "epoch 2/50")  # epoch 1 saved by then
    assert rc == 130 and "interrupted (SIGTERM)" in text, text[-2000:]
    assert f"--resume --out {out}" in text and "Traceback" not in text
    row = json.loads((out / "result.json").read_text())
    assert row["status"] == "interrupted" and row["rerun_on_resume"]
    assert (out / "last.pt").is_file()  # the epochs done are kept for --resume


@pytest.fixture
def readonly_dir(tmp_path):
    """A read-only bind mount of an empty folder (skipped where mounts are not allowed)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    ok = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True)
    if ok.returncode != 0:
        pytest.skip(f"bind mounts not allowed here: {ok.stderr.decode().strip()}")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)],
                          capture_output=True).returncode != 0:
            pytest.skip("read-only remount not allowed here")
        yield src, ro
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_train_into_a_read_only_folder_is_one_line(readonly_dir, env):
    _, ro = readonly_dir
    p = run([sys.executable, TRAIN, "--widths", "8,16", "--image-size", "32",
             "--synthetic-images", "12", "--mode", "throughput", "--steps", "1",
             "--out", str(ro / "run")], env, timeout=120)
    assert p.returncode == 4, p.stderr[-2000:]
    last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("error: cannot write") and "Read-only file system" in last
    assert "Traceback" not in p.stderr


def test_plot_into_a_read_only_folder_is_one_line(readonly_dir, capsys):
    import importlib
    import shutil

    src, ro = readonly_dir
    shutil.copytree(ROOT / "results" / "cpu-2c-amd-epyc-engines", src / "f",
                    ignore=shutil.ignore_patterns("plots", "report.md"))
    plot_cli = importlib.import_module("launch.plot")
    assert plot_cli.main([str(ro / "f")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "--out" in err and "Traceback" not in err
    assert plot_cli.main([str(ro / "f"), "--out", str(src / "elsewhere")]) == 0


def test_a_folder_that_stops_taking_rows_keeps_them_and_the_sweep_goes_on(tmp_path,
                                                                          monkeypatch):
    from segcore.results import rows as rows_mod
    from segcore.sweep import driver
    from segcore.sweep.grid import SweepSpec

    spec = SweepSpec(workers=[1], batch_sizes=[2, 4, 8], depths=[2], engines=["ddp"],
                     loaders=["torch"], precisions=["fp32"], channels_last=[True],
                     image_size=32)

    real = rows_mod.append_row

    def immutable_after_one(folder, row):
        if read_records(folder):
            raise OSError(errno.EPERM, "Operation not permitted", str(folder))
        return real(folder, row)

    monkeypatch.setattr(driver, "run_job", fake_job)
    monkeypatch.setattr(rows_mod, "append_row", immutable_after_one)
    monkeypatch.setattr(driver, "_fallback_rows", lambda out: tmp_path / "kept.jsonl")
    lines: list[str] = []
    with pytest.raises(ConfigError, match=r"2 row\(s\) could not be written.*kept in"):
        driver.run_sweep(spec, tmp_path / "s", "sid", log=lines.append, argv=["x"])
    assert len(read_records(tmp_path / "s")) == 1
    kept = [json.loads(ln) for ln in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in kept] == ["w1-six-u1632-b4-ddp-torch-fp32-cl",
                                           "w1-six-u1632-b8-ddp-torch-fp32-cl"]
    assert sum("could not be written" in ln for ln in lines) == 2


def test_a_failed_torch_save_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    import shutil

    import torch

    from segcore.train import checkpoint

    def fail(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . "
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", fail)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(OSError) as e:
        checkpoint.save_checkpoint({"x": 1}, tmp_path / "last.pt")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "last.pt")
    assert not list(tmp_path.iterdir())  # no temp file left


def test_damaged_images_in_data_are_named_skipped_and_counted(tmp_path, env):
    """A zero-byte and a truncated JPEG in --data: one line each naming the file; the
    run skips them and counts them in its row; --strict stops before training."""
    import shutil

    from segcore.data.synthetic import write_dataset

    data = tmp_path / "sdd"
    write_dataset(data, 14, 64, 96, seed=0)
    photos = sorted((data / "original_images").iterdir())
    photos[0].write_bytes(b"")
    raw = photos[1].read_bytes()
    photos[1].write_bytes(raw[:len(raw) // 2])
    base = [sys.executable, TRAIN, "--data", str(data), "--widths", "8,16", "--image-size",
            "32", "--batch-size", "2", "--mode", "throughput", "--steps", "1",
            "--warmup-steps", "0"]
    p = run(base + ["--out", str(tmp_path / "run")], env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    skipped = [ln for ln in p.stdout.splitlines() if ln.startswith("warning: skipped:")]
    assert len(skipped) == 2 and str(photos[0]) in skipped[0] + skipped[1]
    assert str(photos[1]) in skipped[0] + skipped[1] and "Traceback" not in p.stderr
    row = json.loads((tmp_path / "run" / "result.json").read_text())
    assert row["status"] == "ok" and row["skipped_pairs"] == 2
    p = run(base + ["--strict", "--out", str(tmp_path / "strict")], env, timeout=120)
    assert p.returncode == 2 and str(photos[0]) in p.stderr and str(photos[1]) in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "strict" / "result.json").exists()


def test_resume_refuses_a_dataset_re_prepared_at_the_same_path(tmp_path):
    from segcore.data.synthetic import write_dataset
    from segcore.sweep.driver import _record_start, check_resume_spec
    from segcore.sweep.grid import SweepSpec

    data = tmp_path / "sdd"
    write_dataset(data, 8, 64, 96, seed=0)
    spec = SweepSpec(workers=[1], batch_sizes=[2], depths=[2], engines=["ddp"],
                     loaders=["torch"], precisions=["fp32"], channels_last=[True],
                     data=str(data))
    _record_start(tmp_path / "s", spec, "sid", ["x"], resume=False)
    assert check_resume_spec(tmp_path / "s", spec) == "sid"
    photo = sorted((data / "original_images").iterdir())[0]
    photo.write_bytes(photo.read_bytes() + b"\0" * 100)  # another preparation
    with pytest.raises(ConfigError, match=r"dataset .* changed since this sweep started"):
        check_resume_spec(tmp_path / "s", spec)


SUBREAPER = r"""
import ctypes, os, subprocess, sys, time
from pathlib import Path
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans come to this process
logs, sweep_id, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
drv = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def workers():
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if sweep_id in cmd and "launch/train.py" in cmd and "torch.distributed.run" \
                    not in cmd:
                found.append(cmd)
    return found
t0 = time.time()
while time.time() - t0 < 120 and not workers():
    time.sleep(0.01)
drv.kill()  # kill -9 of the driver at job start (its worker still loading torch)
left = None
t0 = time.time()
while time.time() - t0 < 40:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    left = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and d.name != str(os.getpid()):
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (d / "stat").read_text().split()[2]
            except OSError:
                continue
            if sweep_id in cmd and state != "Z":
                left.append(cmd[:120])
    if not left:
        break
    time.sleep(0.2)
print("left:", left)
"""


@pytest.mark.multiproc
def test_a_killed_driver_takes_its_job_along_under_a_subreaper(tmp_path, env):
    """Under systemd --user or tini -s, orphans go to a subreaper, not to init: a worker
    still loading torch when the driver is killed must notice all the same."""
    out = tmp_path / "k"
    sweep_id = f"reaped-{os.getpid()}"
    args = [sys.executable, SWEEP, "--gpus", "1", "--batch-sizes", "2", *TINY,
            "--measure-steps", "300", "--sweep-id", sweep_id, "--out", str(out)]
    p = subprocess.run([sys.executable, "-c", SUBREAPER, str(out / "logs"), sweep_id, *args],
                       env=env, capture_output=True, text=True, timeout=200)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().endswith("left: []"), p.stdout


def test_the_writer_lock_falls_back_to_a_file_where_folders_cannot_be_locked(tmp_path,
                                                                            monkeypatch):
    """NFS maps flock to byte-range locks, which a folder opened read-only cannot take."""
    import fcntl
    import stat

    from segcore.sweep.driver import FolderBusy, writer_lock

    real = fcntl.flock

    def nfs_like(fd, op):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", nfs_like)
    with writer_lock(tmp_path, ["sweep"]):
        with pytest.raises(FolderBusy, match="another sweep"):
            with writer_lock(tmp_path, ["second"]):
                pass
