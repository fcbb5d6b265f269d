"""The sweep: grid expansion, commands, failure rows, resume, dry run, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from segcore.config import ConfigError
from segcore.sweep.rows import read_records
from segcore.sweep.driver import (SweepSpec, child_env, classify_failure, expand, job_command,
                           mark_noise, parse_engine, preset)

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
    ds = [j for j in jobs if j.flag("--engine") == "deepspeed"]
    assert all(j.flag("--zero-stage") == "2" for j in ds)


def test_repeats_and_presets():
    jobs = expand(spec(repeats=3, workers=[1]))
    assert [j.run_id[-3:] for j in jobs] == ["-r0", "-r1", "-r2"]
    p = preset("paper")
    assert len(p["rows"]) == 12 and p["arch"] == "paper"
    six = [r for r in p["rows"] if r["classes"] == "six"]
    assert {(r["lr"], r["batch"]) for r in six} == {(1e-3, 16)}
    with pytest.raises(ConfigError, match="paper, smoke"):
        preset("nope")


def test_bad_engine_names_the_choices():
    with pytest.raises(ConfigError, match="deepspeed:0"):
        parse_engine("horovod")
    with pytest.raises(ConfigError, match="0, 1, 2 or 3"):
        parse_engine("deepspeed:7")


def test_command_has_exact_workers_and_fresh_rendezvous(tmp_path):
    job = expand(spec())[1]
    cmd = job_command(job, spec(), tmp_path, "s1")
    assert "--nproc-per-node=2" in cmd and "--standalone" in cmd
    multi = spec(nnodes=2, rdzv_endpoint="node0:29500")
    cmd = job_command(expand(multi)[0], multi, tmp_path, "s1")
    assert "--nnodes=2" in cmd and "--rdzv-endpoint=node0:29500" in cmd
    with pytest.raises(ConfigError, match="rdzv-endpoint"):
        job_command(job, spec(nnodes=2), tmp_path, "s1")


def test_child_env_drops_parent_torchrun_variables(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    env = child_env()
    assert not {"MASTER_PORT", "RANK", "TORCHELASTIC_RUN_ID"} & set(env)


@pytest.mark.parametrize("rc,text,timed_out,status", [
    (3, "[rank 0] error: out of memory: CUDA out of memory", False, "oom"),
    (1, "blah\n[rank 1] error: RuntimeError: boom\nTraceback", False, "failed"),
    (-1, "", True, "timeout"),
    (1, "no error line here", False, "failed"),
])
def test_failure_classification(rc, text, timed_out, status):
    got, msg = classify_failure(rc, text, timed_out)
    assert got == status and msg


def test_noise_flag_over_repeats():
    rows = [{"run_id": f"a-r{i}", "status": "ok", "throughput_img_s": t}
            for i, t in enumerate([10.0, 10.5, 12.0])]
    rows += [{"run_id": f"b-r{i}", "status": "ok", "throughput_img_s": t}
             for i, t in enumerate([10.0, 10.2])]
    mark_noise(rows)
    assert all(r["noisy"] for r in rows[:3]) and not any(r["noisy"] for r in rows[3:])
    assert rows[0]["throughput_spread_pct"] == pytest.approx(2 / 10.5 * 100)


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
