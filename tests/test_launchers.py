"""Every launcher the README shows starts training on one machine: plain ``python``,
``torchrun`` (single and two-node rendezvous: tests/test_distributed.py), the DeepSpeed
launcher, and the Slurm templates (tests/test_slurm.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segcore.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
TINY = ["--image-size", "32", "--widths", "8,16", "--norm", "group", "--synthetic-images",
        "12", "--mode", "throughput", "--warmup-steps", "0", "--steps", "2",
        "--batch-size", "2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")}
    e.update(SEGBENCH_CACHE=str(tmp_path_factory.mktemp("cache")), DS_ACCELERATOR="cpu",
             PYTHONUNBUFFERED="1")
    return e


def row(proc, out: Path) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("engine", [pytest.param("single", marks=pytest.mark.slow), "ddp",
                                    "deepspeed"])  # plain single runs are in many tests
def test_plain_python(tmp_path, env, engine):
    out = tmp_path / engine
    proc = subprocess.run([sys.executable, TRAIN, *TINY, "--engine", engine, "--out",
                           str(out)], env=env, capture_output=True, text=True, timeout=240)
    r = row(proc, out)
    assert r["world_size"] == 1 and r["engine"] == engine and r["steps"] == 2


@pytest.mark.multiproc
def test_deepspeed_launcher_trains_on_two_workers(tmp_path, env):
    """``deepspeed --num_gpus 2 launch/train.py``: the launcher passes --local_rank=N."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) \
        or shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher is not installed")
    out = tmp_path / "ds"
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()),
                           TRAIN, *TINY, "--engine", "deepspeed", "--zero-stage", "2",
                           "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert "--local_rank=" in proc.stdout + proc.stderr  # it did pass the flag
    r = row(proc, out)
    assert r["world_size"] == 2 and r["engine"] == "deepspeed" and r["zero_stage"] == 2


def _train_cli():
    spec = importlib.util.spec_from_file_location("segbench_train_cli", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_local_rank_flag_accepted_and_the_environment_wins(tmp_path, monkeypatch):
    cli = _train_cli()
    seen = []
    monkeypatch.setattr("segcore.train.run.run",
                        lambda cfg, log, resume_state: seen.append(os.environ["LOCAL_RANK"]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert cli.main(["--local_rank=1", "--out", str(tmp_path / "a")]) == 0
    assert seen[-1] == "1"  # the flag, when the launcher exported nothing
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.main(["--local-rank", "1", "--out", str(tmp_path / "b")]) == 0
    assert seen[-1] == "0"  # the environment's LOCAL_RANK wins


def test_deepspeed_launcher_sizes_threads_and_nodes_per_node(monkeypatch):
    """Two nodes of two workers under the DeepSpeed launcher (LOCAL_SIZE / CROSS_SIZE):
    threads come from this node's workers, and the row's nnodes is 2, not 1."""
    import torch

    from segcore.dist import init_distributed
    from segcore.host import usable_cores

    for k in ("LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2",
                 "CROSS_SIZE": "2", "CROSS_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    before = torch.get_num_threads()
    try:
        ctx = init_distributed(force_device="cpu")  # no MASTER_ADDR: no group is made
        assert (ctx.world_size, ctx.local_world_size, ctx.nnodes) == (4, 2, 2)
        assert torch.get_num_threads() == max(1, usable_cores() // 2)
    finally:
        torch.set_num_threads(before)
