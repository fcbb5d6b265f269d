"""The sweep: grid expansion, commands, failure rows, resume, dry run, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from segcore.config import ConfigError
from segcore.sweep.driver import check_resume_spec, writer_lock, FolderBusy, _record_start
from segcore.sweep.grid import SweepSpec, expand, parse_engine, preset
from segcore.sweep.jobs import (child_env, classify_failure, failure_row, job_command)
from segcore.results.rows import read_records

ROOT = Path(__file__).resolve().parents[1]
SWEEP = str(ROOT / "launch" / "sweep.py")


def spec(**kw) -> SweepSpec:
    base = dict(workers=[1, 2], batch_sizes=[4], depths=[2], engines=["ddp"],
                loaders=["torch"], precisions=["fp32"], channels_last=[True])
    base.update(kw)
    return SweepSpec(**base)


def test_grid_expands_with_unique_ids_and_workers_fastest():
    jobs = expand(spec(batch_sizes=[4, 8], engines=["ddp", "deepspeed:2", "single"]))
    ids = [j.run_id for j in jobs]
    assert len(ids) == len(set(ids))
    # ddp and deepspeed: 2 worker counts each; single: the 1-worker baseline only
    assert len(jobs) == 2 * (2 + 2 + 1)
    assert [j.workers for j in jobs[:2]] == [1, 2]
    ds = [j for j in jobs if j.config.train.engine == "deepspeed"]
    assert ds and all(j.config.train.zero_stage == 2 for j in ds)


def test_every_job_config_is_resolved_in_the_driver():
    weak = expand(spec(workers=[1, 2], batch_sizes=[4]))
    assert [(j.config.train.world_size, j.config.train.per_worker_batch,
             j.config.train.global_batch_size) for j in weak] == [(1, 4, 4), (2, 4, 8)]
    # linear lr scaling at the larger global batch (the 1-worker batch is the reference)
    assert weak[1].config.train.effective_lr == pytest.approx(2 * weak[0].config.train.lr)
    strong = expand(spec(workers=[1, 2], batch_sizes=[8], strong_scaling=True))
    assert [(j.config.train.per_worker_batch, j.config.train.global_batch_size)
            for j in strong] == [(8, 8), (4, 8)]
    assert strong[1].config.train.effective_lr == strong[0].config.train.effective_lr
    with pytest.raises(ConfigError, match="does not split over 2 worker"):
        expand(spec(workers=[2], batch_sizes=[3], strong_scaling=True))
    with pytest.raises(ConfigError, match="train.lr = inf"):
        expand(spec(overrides={"train": {"lr": float("inf")}}))
    synth = expand(spec(loaders=["synthetic"], workers=[1]))[0]
    assert synth.config.mode == "throughput"  # the mode rule, applied before writing


def test_failed_and_ok_rows_carry_the_same_configuration_columns():
    from segcore.columns import config_columns

    for strong in (False, True):
        job = expand(spec(workers=[2], batch_sizes=[8], strong_scaling=strong))[0]
        fail = failure_row(job, "s", "oom", "out of memory", 1, "cpu", "x")
        cols = config_columns(job.config, nnodes=1, device_type="cpu", device_name="x")
        assert {k: fail[k] for k in cols} == cols
        assert fail["batch_size"] == (4 if strong else 8)  # always the per-worker batch
        assert fail["global_batch_size"] == 8 if strong else 16
        assert fail["params"] > 0 and fail["num_classes"] == 6


def test_repeats_and_presets():
    jobs = expand(spec(repeats=3, workers=[1]))
    assert [j.run_id[-3:] for j in jobs] == ["-r0", "-r1", "-r2"]
    p = preset("paper")
    assert p["arch"] == "paper"
    assert [r["name"] for r in p["rows"]] == [
        "binaire-1", "binaire-1-2", "binaire-1-3", "binaire-1-4", "binaire-1-5",
        "multiclass-3", "multiclass-3-2", "multiclass-3-3", "multiclass-2",
        "multiclass-24", "unlabeled-binary"]
    rows = {r["name"]: r for r in p["rows"]}
    assert (rows["binaire-1-4"]["widths"], rows["binaire-1-4"]["epochs"]) == ("16,64,128", 25)
    assert not rows["binaire-1-2"]["augment"] and rows["binaire-1-3"]["epochs"] == 45
    assert {(r["lr"], r["batch"]) for r in p["rows"] if r["classes"] == "six"} == {(1e-3, 16)}
    assert rows["multiclass-2"]["class_map"].endswith("study-5.toml")
    assert {r["epochs"] for r in preset("paper", epochs=1)["rows"]} == {1}
    with pytest.raises(ConfigError, match="paper, smoke"):
        preset("nope")


def test_bad_engine_names_the_choices():
    with pytest.raises(ConfigError, match="deepspeed:0"):
        parse_engine("horovod")
    with pytest.raises(ConfigError, match="0, 1, 2 or 3"):
        parse_engine("deepspeed:7")


def test_command_starts_the_job_with_its_config_file_and_identity_only(tmp_path):
    job = expand(spec())[1]
    cmd = job_command(job, tmp_path, "s1")
    assert "--nproc-per-node=2" in cmd and "--standalone" in cmd
    i = cmd.index("--config")
    assert cmd[i + 1] == str(tmp_path / "configs" / f"{job.run_id}.toml")
    flags = [c for c in cmd[cmd.index(str(ROOT / "launch" / "train.py")) + 1:]
             if c.startswith("--")]
    assert flags == ["--config", "--run-id", "--sweep-id", "--out"]
    multi = spec(nnodes=2, rdzv_endpoint="node0:29500")
    cmd = job_command(expand(multi)[0], tmp_path, "s1", 2, "node0:29500")
    assert "--nnodes=2" in cmd and "--rdzv-endpoint=node0:29500" in cmd
    with pytest.raises(ConfigError, match="rdzv-endpoint"):
        job_command(job, tmp_path, "s1", 2, None)


def test_child_env_drops_parent_torchrun_variables(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    env = child_env()
    assert not {"MASTER_PORT", "RANK", "TORCHELASTIC_RUN_ID"} & set(env)
    assert env["SEGBENCH_DIE_WITH_PARENT"] == "1"


KILLED_LOG = """[rank0]:W ... Sending process 123 closing signal SIGTERM
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_05:00:00
  host      : h
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4567)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4567
"""


@pytest.mark.parametrize("rc,text,timed_out,status,words", [
    (3, "[rank 0] error: out of memory: CUDA out of memory", False, "oom", "out of memory"),
    (1, "[rank 0] error: out of memory: DefaultCPUAllocator: can't allocate memory", False,
     "oom", "can't allocate"),
    (1, KILLED_LOG, False, "oom", "rank 1 was killed (SIGKILL), likely out of memory"),
    (1, "blah\n[rank 1] error: RuntimeError: boom\nTraceback", False, "failed", "boom"),
    (-1, "", True, "timeout", "--timeout"),
    (1, "no error line here", False, "failed", "exit code 1"),
    # a signal to rank 1: rank 0 then fails in a collective, but rank 1 is the cause
    (1, "[rank 0] error: RuntimeError: Connection closed by peer\n"
        + KILLED_LOG.replace("-9 (pid", "-15 (pid").replace("Signal 9 (SIGKILL)", "Signal 15"),
     False, "failed", "rank 1 was stopped by SIGTERM (exit code -15)"),
    (1, "[rank 0] error: RuntimeError: Connection closed by peer\n[rank 1] interrupted "
        "(SIGTERM): checkpoints kept\n" + KILLED_LOG.replace("-9 (pid", "130 (pid"),
     False, "failed", "rank 1: interrupted (SIGTERM)"),
])
def test_failure_classification(rc, text, timed_out, status, words):
    got, msg = classify_failure(rc, text, timed_out)
    assert got == status and words in msg


def test_one_writer_per_folder(tmp_path):
    with writer_lock(tmp_path, ["sweep", "--out", "x"]):
        with pytest.raises(FolderBusy, match=r"another sweep \(pid \d+ .*sweep --out x"):
            with writer_lock(tmp_path, ["second"]):
                pass
    with writer_lock(tmp_path, ["third"]):  # released when the holder ends
        pass


def test_resume_refuses_another_grid_and_keeps_the_sweep_id(tmp_path):
    s = spec(image_size=64)
    _record_start(tmp_path, s, "first-id", ["launch/sweep.py"], resume=False)
    assert check_resume_spec(tmp_path, spec(image_size=64)) == "first-id"
    with pytest.raises(ConfigError, match=r"image_size: recorded 64, now 128.*steps"):
        check_resume_spec(tmp_path, spec(image_size=128, steps=12))
    _record_start(tmp_path, s, "first-id", ["launch/sweep.py", "--resume"], resume=True)
    env = json.loads((tmp_path / "env.json").read_text())
    assert [c["resume"] for c in env["commands"]] == [False, True]


def test_resume_compares_the_grid_not_the_transport(tmp_path):
    # A resumed Slurm job gets another rendezvous endpoint (and may get another time
    # limit): the same grid, accepted.
    s = spec(nnodes=2, rdzv_endpoint="node0:29500", timeout_s=600)
    _record_start(tmp_path, s, "sid", ["launch/sweep.py"], resume=False)
    again = spec(nnodes=2, rdzv_endpoint="node7:31234", timeout_s=900)
    assert check_resume_spec(tmp_path, again) == "sid"
    # A folder recorded before a field existed holds that field's default.
    rec = json.loads((tmp_path / "sweep.json").read_text())
    del rec["spec"]["axes"]
    (tmp_path / "sweep.json").write_text(json.dumps(rec))
    assert check_resume_spec(tmp_path, again) == "sid"
    with pytest.raises(ConfigError, match="axes"):
        check_resume_spec(tmp_path, spec(nnodes=2, axes={"train.lr": ["0.1"]}))


def sweep(args, env, timeout=400):
    return subprocess.run([sys.executable, SWEEP, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = child_env({"SEGBENCH_CACHE": str(tmp_path_factory.mktemp("cache"))})
    return e


TINY = ["--image-size", "32", "--depths", "2", "--epochs", "1", "--warmup-steps", "1",
        "--train-arg=--synthetic-images=24"]


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, env):
    out = tmp_path / "dry"
    p = sweep(["--gpus", "1,2", "--batch-sizes", "2,4", *TINY, "--out", str(out),
               "--dry-run"], env)
    assert p.returncode == 0, p.stderr
    cmds = [ln for ln in p.stdout.splitlines() if "torch.distributed.run" in ln]
    assert len(cmds) == 4
    assert not (out / "runs.jsonl").exists() and not (out / "runs").exists()
    # the configuration files the commands name are written, resolved for their job
    written = sorted((out / "configs").glob("*.toml"))
    assert len(written) == 4 and all(str(w) in p.stdout for w in written)
    from segcore.config import load_config
    assert all(load_config(w).resolved for w in written)


# slow: the same command as users type it is test_headline.py's (in CI); failure rows
# and resume are the integrity tests' (kill -9, SIGTERM, OOM rows)
@pytest.mark.slow
@pytest.mark.multiproc
def test_tiny_sweep_end_to_end_with_a_failing_configuration_and_resume(tmp_path, env):
    out = tmp_path / "sweep"
    # batch 64 cannot fill one batch from 20 training images: that job fails with a
    # configuration error, and the sweep goes on.
    args = ["--gpus", "1", "--batch-sizes", "4,64", *TINY, "--out", str(out)]
    p = sweep(args, env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = {r["run_id"]: r for r in read_records(out)}
    assert len(rows) == 2
    good = next(r for r in rows.values() if r["batch_size"] == 4)
    bad = next(r for r in rows.values() if r["batch_size"] == 64)
    assert good["status"] == "ok" and good["throughput_img_s"] > 0
    assert good["speedup"] == pytest.approx(1.0)
    assert good["launch_overhead_s"] > 0 and good["mIoU"] is not None
    assert bad["status"] == "failed" and "fewer than one global batch" in bad["error"]
    for name in ("runs.csv", "runs.jsonl", "env.json", "report.md"):
        assert (out / name).is_file(), name
    assert (out / "configs" / f"{good['run_id']}.toml").is_file()
    assert (out / "logs" / f"{bad['run_id']}.log").is_file()
    assert json.loads((out / "env.json").read_text())["torch_version"]
    # --resume re-runs nothing that is recorded
    p = sweep(args + ["--resume"], env)
    assert p.returncode == 0, p.stderr
    assert "0 to run" in p.stdout
    assert len(read_records(out)) == 2
    # without --resume an existing folder is refused, not overwritten
    p = sweep(args, env)
    assert p.returncode == 2 and "--resume" in p.stderr


def test_other_nodes_run_the_writer_nodes_plan_and_write_nothing(tmp_path, monkeypatch):
    """Node 1 of a resumed 2-node sweep: it waits for node 0's plan, runs exactly its
    configurations under the folder's sweep id (so both meet at one rendezvous), and
    writes nothing into the shared folder."""
    import threading

    from segcore.sweep import driver
    from segcore.sweep.driver import SweepInterrupted

    s = spec(workers=[1], batch_sizes=[2, 4], nnodes=2, rdzv_endpoint="node0:31000")
    out = tmp_path / "s"
    cmds: dict[str, list[list[str]]] = {"writer": [], "other": []}

    def fake_job(cmd, log_path, timeout_s, env, keep_fds=()):
        who = "writer" if keep_fds else "other"
        cmds[who].append(cmd)
        if who == "writer":
            if "b4" in cmd[cmd.index("--run-id") + 1] and len(cmds["writer"]) == 2:
                raise KeyboardInterrupt  # the first launch is cut (SIGTERM) at batch 4
            run_dir = Path(cmd[cmd.index("--out") + 1])
            run_dir.mkdir(parents=True, exist_ok=True)
            rid, sid = cmd[cmd.index("--run-id") + 1], cmd[cmd.index("--sweep-id") + 1]
            (run_dir / "result.json").write_text(json.dumps(
                {"run_id": rid, "sweep_id": sid, "status": "ok", "throughput_img_s": 1.0}))
        return 0, False

    monkeypatch.setattr(driver, "run_job", fake_job)
    monkeypatch.setattr(driver, "_measure_interconnect", lambda *a: None)
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    with pytest.raises(SweepInterrupted):
        driver.run_sweep(s, out, "folder-id", log=lambda m: None, argv=["x"])
    # The resubmitted job: another job id, and its own sweep id on the command line.
    monkeypatch.setenv("SLURM_JOB_ID", "200")
    cmds["writer"].clear()
    configs = {p.name: p.read_bytes() for p in (out / "configs").iterdir()}
    node1 = threading.Thread(target=driver.run_sweep, args=(s, out, "slurm-200"),
                             kwargs=dict(is_writer=False, log=lambda m: None))
    node1.start()
    driver.run_sweep(s, out, "slurm-200", resume=True, log=lambda m: None, argv=["x"])
    node1.join(30)
    assert not node1.is_alive()
    assert len(cmds["writer"]) == 1 and cmds["other"] == cmds["writer"]  # one rendezvous
    assert "b4" in cmds["other"][0][cmds["other"][0].index("--run-id") + 1]
    assert cmds["other"][0][cmds["other"][0].index("--sweep-id") + 1] == "folder-id"
    assert {p.name: p.read_bytes() for p in (out / "configs").iterdir()} == configs
    assert [r["status"] for r in read_records(out)] == ["ok", "ok"]
