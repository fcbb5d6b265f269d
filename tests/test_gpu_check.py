"""bench/gpu_check.py: the first-GPU acceptance script, checked in its CPU form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check
from bench.gpu_check import StepFailed, check_packages, missing_packages

REPO = Path(__file__).resolve().parents[1]


def lines() -> tuple[list[str], object]:
    out: list[str] = []
    return out, out.append


def test_missing_packages_are_named_in_one_line():
    got, log = lines()
    error, optional = check_packages(None, log, required={"json": "json",
                                                          "no_such_mod_1x": "no-such-pkg"},
                                     optional={"no_such_mod_2y": "no-such-optional"})
    assert error == ("missing packages: no-such-pkg (pip install them, or pass --wheels DIR "
                     "with their wheels)")
    assert "\n" not in error and optional == ["no-such-optional"] and got == []
    assert missing_packages({"json": "json", "os": "os"}) == []


def test_wheels_folder_is_tried_then_named(tmp_path):
    got, log = lines()
    error, optional = check_packages(tmp_path, log,
                                     required={"no_such_mod_1x": "no-such-pkg"},
                                     optional={"no_such_mod_2y": "no-such-optional"})
    # The required packages in one pip call, each optional one in its own.
    assert [m for m in got if m.startswith("installing")] == [
        f"installing from {tmp_path}: no-such-pkg",
        f"installing from {tmp_path}: no-such-optional"]
    assert error == "missing packages: no-such-pkg (pip install them)"
    assert optional == ["no-such-optional"]
    error, _ = check_packages(tmp_path / "nope", log,
                              required={"no_such_mod_1x": "no-such-pkg"}, optional={})
    assert error == f"--wheels {tmp_path / 'nope'} is not a folder"


def test_unknown_step_and_list(capsys):
    assert gpu_check.main(["--only", "env,nope"]) == 2
    assert "--only nope: unknown step(s)" in capsys.readouterr().out
    assert gpu_check.main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in listed] == [name for name, _, _ in gpu_check.STEPS]


def test_results_folder_is_named_after_the_hardware(monkeypatch):
    from segcore import host

    gpu_env = {"cuda_devices": [{"name": "NVIDIA H200", "memory_mb": 143771}],
               "cpu_model": "AMD EPYC 9654", "cpu_count": 16}
    monkeypatch.setattr(host, "capture_env", lambda *a, **k: dict(gpu_env))
    assert gpu_check.default_out("cuda").name == "1xH200-140GB"
    assert gpu_check.default_out("cuda").parent == REPO / "results" / "gpu-check"
    assert gpu_check.default_out("cpu").name.startswith("cpu-16c-")


def test_a_failing_step_fails_the_run_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    def broken(c):
        raise StepFailed("checkpoint keys carry wrapper prefixes")

    ran = []
    monkeypatch.setattr(gpu_check, "STEPS", [
        ("env", broken, None), ("timing", lambda c: ran.append(1) or {"ok": 1}, None),
        ("dali", lambda c: {}, "no-such-optional")])
    monkeypatch.setattr(gpu_check, "check_packages",
                        lambda wheels, log: (None, ["no-such-optional"]))
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path)]) == 1
    assert ran == [1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [
        ("env", "fail"), ("timing", "pass"), ("dali", "skip")]
    assert summary["steps"][0]["detail"] == "checkpoint keys carry wrapper prefixes"
    assert "| env | fail |" in (tmp_path / "summary.md").read_text()
    assert "failed: env" in capsys.readouterr().out


def test_timing_comparison_measures_both_ways():
    got = gpu_check.compare_timing("cpu", image=32, batch=1, steps=3, rounds=2, warmup=1)
    assert got["per_step_img_s"] > 0 and got["windowed_img_s"] > 0
    assert got["windowed_over_per_step"] == pytest.approx(
        got["windowed_img_s"] / got["per_step_img_s"], rel=0.01)


def test_accuracy_step_in_its_cpu_form(tmp_path):
    """One training run through launch/train.py, checked as on the GPU: the row's timing
    method, per-phase memory, MFU against both peaks, artefacts without wrapper keys."""
    assert gpu_check.main(["--device", "cpu", "--only", "accuracy", "--out",
                           str(tmp_path)]) == 0
    row = json.loads((tmp_path / "steps/accuracy/result.json").read_text())
    assert row["timing_method"] == "host_clock" and row["dist_backend"] is None
    phases = {k: row[f"mem_{k}_mb"] for k in ("warmup", "train", "val")}
    assert row["mem_workload_mb"] == max(v for v in phases.values() if v is not None)
    assert row["mem_workload_phase"] == max(phases, key=lambda k: phases[k] or -1.0)
    assert row["mem_val_mb"] > 0 and row["mem_warmup_mb"] is not None
    assert row["gemm_tflops_source"].startswith(("measured matmul ", "measured conv3x3 "))
    assert row["channels_last"] is True and row["channels_last_requested"] is True
    assert row["loader_workers"] == 0  # CPU: the training threads own the cores


@pytest.mark.slow
def test_cpu_form_of_the_whole_check(tmp_path):
    """``python bench/gpu_check.py --device cpu``: every step passes (DALI may be skipped
    where it is not installed); about 2-3 minutes on 2 cores."""
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert set(status) == {name for name, _, _ in gpu_check.STEPS}
    allowed_skips = {"dali", "zero2", "zero3", "compile"}  # optional packages
    assert all(v == "pass" or (v == "skip" and k in allowed_skips) for k, v in status.items())
    for name in ("env.json", "summary.md", "logs/accuracy.log",
                 "steps/accuracy/checkpoint.pt", "steps/predict/pred/photo0_classes.png",
                 "steps/predict/pred/timing.json"):
        assert (tmp_path / name).is_file(), name
    timing = next(s for s in summary["steps"] if s["name"] == "timing")["numbers"]
    assert timing["default"]["per_step_img_s"] > 0 and timing["default"]["windowed_img_s"] > 0
