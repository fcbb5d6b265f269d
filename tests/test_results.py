"""Unit tests of segcore.results: row schema, atomic writes, environment capture."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segcore.results.rows import RESULT_COLUMNS, append_row, read_rows
from segcore.host import capture_env, hardware_tag
from segcore.io import to_jsonable, write_json_atomic, write_text_atomic

DESIGN_COLUMNS = [
    "sweep_id", "run_id", "status", "error",
    "engine", "zero_stage", "loader", "precision", "channels_last", "compile",
    "world_size", "nnodes", "device_type", "device_name", "batch_size",
    "global_batch_size", "arch", "depth", "widths", "image_size", "class_scheme",
    "num_classes", "params",
    "warmup_steps", "measured_steps", "throughput_img_s", "step_ms_p50", "step_ms_p90",
    "step_ms_p99", "data_wait_pct", "speedup", "scaling_efficiency", "tflops", "mfu",
    "peak_mem_mb", "device_mem_mb", "host_rss_mb", "gpu_util_pct", "power_w",
    "epochs", "train_time_s", "time_to_target_s", "val_loss", "aAcc", "mIoU", "mDice",
    "mAcc",
]
EXTRAS = ["repeat", "step_ms_mean", "step_ms_std", "fwd_bwd_ms_p50", "optim_ms_p50",
          "launch_overhead_s", "peak_mem_source", "throughput_spread_pct",
          "started_at", "finished_at", "wall_s", "hw_ceiling_speedup",
          "time_to_target_speedup", "low_confidence", "flags", "throughput_ci95_lo",
          "throughput_ci95_hi", "throughput_ci95_pct", "oversubscribed", "hw_parallel_limit",
          "precision_emulated", "mem_workload_mb", "mem_baseline_mb", "lr_scaling",
          "base_lr", "samples_seen", "F1", "mConfDiag", "mAP", "mAUC", "session",
          "data_source", "val_images", "mem_warmup_mb", "mem_train_mb", "mem_val_mb",
          "mem_workload_phase", "loader_img_s", "loader_img_s_per_worker", "loader_batches",
          "loader_s", "loader_step_ratio", "decode", "wall_throughput_img_s",
          "measured_time_share", "energy_j_per_img"]


def row(run_id: str, **extra) -> dict:
    r = {"sweep_id": "s1", "run_id": run_id, "status": "ok", "engine": "ddp",
         "world_size": 2, "batch_size": 8, "widths": (16, 32, 64),
         "throughput_img_s": 123.5, "mIoU": 0.5}
    r.update(extra)
    return r


def test_result_columns_schema():
    assert RESULT_COLUMNS == DESIGN_COLUMNS + EXTRAS
    assert len(set(RESULT_COLUMNS)) == len(RESULT_COLUMNS)


def test_every_list_of_columns_derives_from_the_one_schema():
    """The writers, the analysis and the labels read one declaration per column."""
    from segcore.results import analysis, labels, schema

    numeric = {c.name for c in schema.COLUMNS if c.numeric}
    assert set(analysis.NUMERIC_COLUMNS) == numeric
    assert set(analysis.FAMILY_COLUMNS) == {c.name for c in schema.COLUMNS
                                            if c.family == "always"}
    # every measurement a repeat can change is reduced, accuracy included
    for name in ("throughput_img_s", "mIoU", "F1", "mConfDiag", "mem_workload_mb",
                 "loader_img_s", "energy_j_per_img"):
        assert schema.BY_NAME[name].reduce == "median", name
    assert schema.unit_of("mem_workload_mb") == "MiB" and schema.unit_of("peak_mem_mb") == "MiB"
    assert labels.piece("depth", 4, {}) == "depth 4"  # the legend format of the schema
    with pytest.raises(ValueError):
        schema.Column("x", "nowhere", "text")


def test_append_twice_and_column_order(tmp_path):
    append_row(tmp_path, row("a", **{"IoU.grass": 0.7, "custom_note": "x"}))
    append_row(tmp_path, row("b", **{"IoU.roof": 0.2, "IoU.grass": 0.6}))
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["run_id"] == "b"
    csv = pd.read_csv(tmp_path / "runs.csv")
    assert len(csv) == 2
    cols = list(csv.columns)
    assert cols[:len(RESULT_COLUMNS)] == RESULT_COLUMNS
    # IoU columns first-seen, then other extras; extra keys are kept, not dropped.
    assert cols[len(RESULT_COLUMNS):] == ["IoU.grass", "IoU.roof", "custom_note"]
    assert csv["custom_note"].tolist()[0] == "x" and pd.isna(csv["custom_note"][1])
    assert csv["IoU.roof"].isna().tolist() == [True, False]
    assert json.loads(csv["widths"][0]) == [16, 32, 64]  # JSON, not a Python repr
    df = read_rows(tmp_path)
    assert list(df.columns) == cols
    assert df["run_id"].tolist() == ["a", "b"]
    assert df["throughput_img_s"].tolist() == [123.5, 123.5]


def test_nan_round_trip(tmp_path):
    append_row(tmp_path, row("a", val_loss=float("nan"), mfu=np.float32("nan"),
                             tflops=float("inf"), params=np.int64(1234),
                             noisy=np.bool_(True)))
    text = (tmp_path / "runs.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    obj = json.loads(text)
    assert obj["val_loss"] is None and obj["mfu"] is None and obj["tflops"] is None
    assert obj["params"] == 1234 and obj["noisy"] is True
    df = read_rows(tmp_path)
    assert math.isnan(df["val_loss"][0])
    csv = pd.read_csv(tmp_path / "runs.csv")
    assert math.isnan(csv["val_loss"][0]) and csv["params"][0] == 1234


def test_read_rows_empty(tmp_path):
    df = read_rows(tmp_path / "missing")
    assert df.empty and list(df.columns) == RESULT_COLUMNS


def test_read_rows_skips_corrupt_line_with_warning(tmp_path):
    append_row(tmp_path, row("a"))
    with open(tmp_path / "runs.jsonl", "a") as f:
        f.write('{"run_id": "half-writ')
    with pytest.warns(UserWarning, match="runs.jsonl:2"):
        df = read_rows(tmp_path)
    assert df["run_id"].tolist() == ["a"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_leaves_old_files_intact(tmp_path, monkeypatch, failing):
    append_row(tmp_path, row("a"))
    jsonl_before = (tmp_path / "runs.jsonl").read_bytes()
    csv_before = (tmp_path / "runs.csv").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("simulated crash in the middle of a write")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="simulated"):
        append_row(tmp_path, row("b"))
    monkeypatch.undo()
    assert (tmp_path / "runs.jsonl").read_bytes() == jsonl_before
    assert (tmp_path / "runs.csv").read_bytes() == csv_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv", "runs.jsonl"]
    append_row(tmp_path, row("b"))  # and the folder is still usable
    assert read_rows(tmp_path)["run_id"].tolist() == ["a", "b"]


def _append_many(folder: str, worker: int) -> None:
    for i in range(8):
        append_row(folder, {"run_id": f"w{worker}-{i}"})


def test_concurrent_appenders_lose_no_row(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(read_rows(tmp_path)) == 16
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 16


def test_write_json_and_text_atomic(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_json_atomic(path, {"a": float("nan"), "b": (1, 2), "p": Path("/x"),
                             "n": np.float64(2.5)})
    assert json.loads(path.read_text()) == {"a": None, "b": [1, 2], "p": "/x", "n": 2.5}
    text = tmp_path / "notes.txt"
    write_text_atomic(text, "one")
    os.chmod(text, 0o640)
    write_text_atomic(text, "two")
    assert text.read_text() == "two"
    assert (text.stat().st_mode & 0o777) == 0o640  # mode of the replaced file is kept
    assert not [p for p in tmp_path.rglob("*.tmp")]


ENV_KEYS = {
    "timestamp_utc", "python_version", "platform", "hostname", "cpu_model", "cpu_count",
    "cpu_affinity_count", "mem_total_mb", "torch_version", "cuda_version",
    "cudnn_version", "nccl_version", "cuda_devices", "dali_version", "deepspeed_version",
    "nvidia_driver_version", "nvml_gpus", "git_commit", "git_dirty", "host_count",
    "argv", "command_line",
}


def test_capture_env(monkeypatch):
    monkeypatch.setenv("NNODES", "3")
    env = capture_env(["launch/sweep.py", "--gpus", "1,2"])
    assert ENV_KEYS <= set(env)
    json.dumps(env, allow_nan=False)  # serializable as strict JSON
    assert env["argv"] == ["launch/sweep.py", "--gpus", "1,2"]
    assert env["command_line"] == "launch/sweep.py --gpus 1,2"
    assert env["host_count"] == 3
    assert env["cpu_count"] >= 1 and env["mem_total_mb"] > 0
    assert env["torch_version"]
    assert env["timestamp_utc"].endswith("+00:00")


def test_capture_env_default_host_count(monkeypatch):
    for var in ("NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(var, raising=False)
    assert capture_env([])["host_count"] == 1


SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.mark.parametrize("env,expected", [
    ({"cuda_devices": [{"name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559}]},
     "1xH100-80GB"),
    ({"cuda_devices": [{"name": "NVIDIA H200", "memory_mb": 143771}] * 2}, "2xH200-140GB"),
    ({"cuda_devices": [{"name": "NVIDIA A100-SXM4-80GB", "memory_mb": 81920}] * 8,
      "host_count": 2}, "2n-8xA100-SXM4-80GB"),
    ({"cuda_devices": [], "nvml_gpus": [{"name": "Tesla T4", "memory_mb": 15360}]},
     "1xT4-15GB"),
    ({"cpu_model": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cpu_count": 4,
      "cpu_affinity_count": 2}, "cpu-2c-intel-xeon-8481c"),
    ({"cpu_model": "AMD EPYC 7B13 64-Core Processor", "cpu_count": 8},
     "cpu-8c-amd-epyc-7b13"),
    ({}, "cpu-0c-unknown"),
])
def test_hardware_tag(env, expected):
    assert hardware_tag(env) == expected


def test_hardware_tag_is_filesystem_safe():
    assert SAFE.match(hardware_tag(capture_env([])))
    odd = {"cuda_devices": [{"name": "Weird/GPU: 9000 <x>", "memory_mb": None}]}
    assert SAFE.match(hardware_tag(odd))
    assert SAFE.match(hardware_tag({"cpu_model": "../../etc ∆ passwd", "cpu_count": 1}))


def test_to_jsonable_handles_tensors():
    torch = pytest.importorskip("torch")
    assert to_jsonable({"t": torch.tensor([1.5, float("nan")])}) == {"t": [1.5, None]}
    assert to_jsonable(torch.tensor(3)) == 3


def test_integer_column_with_gaps_stays_integer_in_csv(tmp_path):
    append_row(tmp_path, row("a", params=1234, status="ok"))
    append_row(tmp_path, row("b", status="oom", error="CUDA out of memory"))
    text = (tmp_path / "runs.csv").read_text()
    assert ",1234," in text and "1234.0" not in text
    assert read_rows(tmp_path)["params"].tolist()[0] == 1234


def test_the_hardware_tag_tells_cpu_generations_apart():
    """Two hosts both named "AMD EPYC" ran the same configuration 2x apart: the CPU's
    family and model, recorded in env.json, go into the tag."""
    base = {"cpu_model": "AMD EPYC", "cpu_affinity_count": 2}
    zen4 = hardware_tag({**base, "cpu_id": {"family": 25, "model": 17}})
    zen5 = hardware_tag({**base, "cpu_id": {"family": 26, "model": 2}})
    assert zen4 == "cpu-2c-amd-epyc-f25m17" and zen5 == "cpu-2c-amd-epyc-f26m2"
    ident = capture_env([])["cpu_id"]
    assert isinstance(ident, dict) and set(ident.get("flags", [])) <= {
        "avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_fp16",
        "sve", "asimd"}
