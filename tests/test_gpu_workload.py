"""The GPU-shaped workload, checked in its CPU form: the gpu preset and its batch probe,
synthetic batches at any crop size, wall clock beside steady state, and throughput runs
that write no checkpoint."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segcore.train.probe import largest_fitting
from segcore.train.timing import step_timer

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")


def test_the_gpu_preset_dry_run_shows_the_gpu_workload(tmp_path, capsys):
    sweep_cli = importlib.import_module("launch.sweep")
    assert sweep_cli.main(["--preset", "gpu", "--gpus", "1", "--dry-run",
                           "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    work = [ln for ln in out.splitlines() if ln.startswith("workload:")]
    assert len(work) == 2 and all("widths 64-128-256-512-1024, 512 px" in w for w in work)
    assert all("bf16, channels-last" in w and "synthetic loader" in w for w in work)
    assert {("compiled" in w) for w in work} == {True, False}  # compile is an axis
    assert "batch: probed on the GPU at start" in out
    assert sweep_cli.main(["--preset", "gpu", "--batch-sizes", "4", "--dry-run"]) == 2
    assert "--preset gpu sets --batch-sizes itself" in capsys.readouterr().err


def test_the_probe_finds_the_largest_batch_within_the_budget():
    calls = []

    def peak(b):  # 100 MB per image + 50 MB fixed; out of memory from 32 images on
        calls.append(b)
        return None if b >= 32 else 50 + 100 * b

    assert largest_fitting(peak, budget=1000) == (8, 850)  # 16 too big; 12 too
    assert largest_fitting(peak, budget=1300) == (12, 1250)  # the bisection's gain
    assert largest_fitting(peak, budget=10_000) == (24, 2450)  # 32 ran out of memory
    with pytest.raises(ValueError, match="batch 1 does not fit"):
        largest_fitting(peak, budget=100)


def test_wall_clock_beside_steady_state():
    """A pause between steps (an epoch boundary, a checkpoint) is out of the steady-state
    throughput but in the wall-clock one; the share says how much."""
    t = step_timer(0, torch.device("cpu"))
    for i in range(4):
        t.begin()
        time.sleep(0.02)
        t.end(2)
        if i == 1:
            with t.paused():
                time.sleep(0.08)  # checkpoint
    s = t.summary()
    assert s["wall_throughput_img_s"] < 0.7 * s["throughput_img_s"]
    assert 0.3 < s["measured_time_share"] < 0.7


def test_a_low_measured_share_is_flagged_not_ranked():
    from segcore.results import analysis

    base = {"status": "ok", "engine": "ddp", "world_size": 1, "batch_size": 2,
            "measured_steps": 30, "throughput_img_s": 10.0, "throughput_ci95_pct": 1.0,
            "mode": "throughput"}
    rows = analysis.annotate([{**base, "run_id": "a", "measured_time_share": 0.5},
                              {**base, "run_id": "b", "batch_size": 4,
                               "measured_time_share": 0.95}])
    flags = {r["run_id"]: r["flags"] for r in rows}
    assert "wall-gap" in flags["a"] and "wall-gap" not in flags["b"]


@pytest.mark.multiproc
def test_synthetic_512px_throughput_run_writes_no_checkpoint_and_both_throughputs(tmp_path):
    base = [sys.executable, TRAIN, "--loader", "synthetic", "--image-size", "512",
            "--widths", "8,16", "--batch-size", "1", "--warmup-steps", "1",
            "--measure-steps", "2", "--synthetic-images", "12", "--norm", "group"]
    p = subprocess.run(base + ["--out", str(tmp_path / "a")], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    row = json.loads((tmp_path / "a" / "result.json").read_text())
    assert row["image_size"] == 512 and row["mode"] == "throughput"
    assert row["wall_throughput_img_s"] > 0 and 0 < row["measured_time_share"] <= 1
    assert row["wall_throughput_img_s"] <= row["throughput_img_s"] * 1.0001
    assert not list((tmp_path / "a").glob("*.pt"))  # a speed run writes no checkpoint
    p = subprocess.run(base + ["--save-checkpoints", "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "b" / "last.pt").is_file()


def test_a_resumed_gpu_preset_keeps_the_batch_its_folder_recorded(tmp_path, capsys):
    """A new probe could find another batch (and so other run ids): a resume takes the
    recorded one, and what the rows were told about it is not part of the grid."""
    from segcore.sweep.driver import _record_start, check_resume_spec
    from segcore.sweep.grid import SweepSpec, preset

    sweep_cli = importlib.import_module("launch.sweep")
    p = preset("gpu")
    spec = SweepSpec(workers=[1], batch_sizes=[4], depths=[3], engines=["ddp"],
                     loaders=p["loaders"], precisions=p["precisions"],
                     channels_last=p["channels_last"], preset_rows=[dict(p["rows"][0],
                                                                         batch=24)],
                     row_extra={"batch_source": "probe", "batch_probe_peak_mb": 100.0},
                     preset="gpu")
    _record_start(tmp_path, spec, "sid", ["x"], resume=False)
    again = SweepSpec(**{**spec.to_dict(), "preset_rows": [dict(p["rows"][0])],
                         "row_extra": {}})
    recorded = json.loads((tmp_path / "sweep.json").read_text())["spec"]
    sweep_cli._probe_batch(again, cuda=True, dry_run=False, recorded=recorded)
    assert again.preset_rows[0]["batch"] == 24 and "recorded" in capsys.readouterr().out
    again.row_extra = {"batch_source": "probe", "batch_probe_peak_mb": 101.0}
    assert check_resume_spec(tmp_path, again) == "sid"
