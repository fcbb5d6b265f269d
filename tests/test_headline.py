"""The main job's commands as users type them (README, DESIGN), at tiny sizes: both
launchers measure the interconnect, print no traceback and record ok rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segcore.dist import free_port
from segcore.sweep.jobs import child_env
from segcore.results.rows import read_records

ROOT = Path(__file__).resolve().parents[1]
# Tiny sizes; everything else as the README writes it.
TINY = ["--gpus", "1,2", "--batch-sizes", "2", "--depths", "2", "--image-size", "32",
        "--epochs", "1", "--warmup-steps", "1", "--measure-steps", "3",
        "--train-arg=--synthetic-images=24"]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [shutil.which("torchrun") or "torchrun"]


@pytest.mark.multiproc
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_the_headline_sweep_as_users_type_it(launcher, tmp_path):
    env = child_env({"SEGBENCH_CACHE": str(tmp_path / "cache")})
    # torchrun's own default port (29500) may be taken on a shared machine; its
    # PET_MASTER_PORT variable moves it without changing the command line.
    env["PET_MASTER_PORT"] = str(free_port())
    head = [sys.executable] if launcher == "python" else _torchrun()
    out = tmp_path / "sweep"
    p = subprocess.run([*head, "launch/sweep.py", *TINY, "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=400)
    console = p.stdout + p.stderr
    assert p.returncode == 0, console[-3000:]
    assert "Traceback" not in console and "Exception raised from" not in console, \
        console[-3000:]
    comm = json.loads((out / "commbench.json").read_text())
    assert comm["world_size"] == 2 and "all_reduce" in comm["collectives"], comm
    rows = read_records(out)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    assert {r["world_size"] for r in rows} == {1, 2}
    assert "The interconnect" not in (out / "report.md").read_text()  # it was measured
    assert os.path.getsize(out / "commbench.json") > 0
