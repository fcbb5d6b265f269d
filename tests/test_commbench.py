"""Communication benchmark: DDP's bucket layout, statistics, the alpha-beta fit, and the
benchmark itself on 2 gloo workers (library, plain python and torchrun)."""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segcore.config import ModelConfig
from segcore.dist import free_port
from segcore.model import build_model
from segcore.scaling import comm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "launch" / "commbench.py")


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- buckets


def test_bucket_layout_closes_at_the_cap_and_may_overshoot_by_one_tensor():
    kib, mib = comm.KIB, comm.MIB
    # first cap 1 MiB: 600 + 600 KiB closes the first bucket at 1200 KiB
    assert comm.bucket_layout([600 * kib, 600 * kib, 10 * mib, 20 * mib, 1 * mib],
                              first_cap=mib, cap=25 * mib) == [1200 * kib, 30 * mib, 1 * mib]
    assert comm.bucket_layout([]) == []
    assert comm.bucket_layout([100], first_cap=1000, cap=1000) == [100]


def test_bucket_layout_agrees_with_torch_on_the_same_order():
    import torch.distributed as dist

    model = build_model(ModelConfig(widths=(16, 32, 64, 128, 256, 512)), 6)
    params = list(reversed(list(model.parameters())))
    idx, _ = dist._compute_bucket_assignment_by_size(
        params, [comm.DDP_FIRST_BUCKET_BYTES, comm.DDP_BUCKET_BYTES], [False] * len(params))
    theirs = sorted(sum(params[i].numel() * 4 for i in b) for b in idx)
    ours = comm.bucket_layout([p.numel() * 4 for p in params])
    assert sorted(ours) == theirs and len(ours) >= 3


def test_ddp_buckets_equal_what_ddp_rebuilds_after_the_first_steps():
    """DDP rebuilds its buckets in the order gradients arrived; a U-Net's skip connections
    make that order differ from reverse registration, and ddp_buckets follows it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    cfg = ModelConfig(widths=(16, 32, 64, 128, 256, 512), channels_last=False)
    model = build_model(cfg, 6)
    ours = comm.ddp_buckets(model, (1, 3, 64, 64))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        ddp = DDP(model)
        for _ in range(3):
            ddp(torch.randn(2, 3, 64, 64)).sum().backward()
        rebuilt = ddp._get_ddp_logging_data()["rebuilt_bucket_sizes"]
    finally:
        dist.destroy_process_group()
    assert [int(v) for v in str(rebuilt).split(",")] == ours
    naive = comm.bucket_layout([p.numel() * 4 for p in reversed(list(model.parameters()))])
    assert naive != ours  # the skip connections matter


def test_describe_unet_counts_parameters_and_units():
    d = comm.describe_unet("modern", (16, 32, 64), "six")
    model = build_model(ModelConfig(widths=(16, 32, 64)), 6)
    n = sum(p.numel() for p in model.parameters())
    assert d["params"] == n and d["grad_bytes"] == 4 * n
    assert sum(d["ddp_buckets"]) == 4 * n
    # every parameter in exactly one FSDP unit, the root's head included
    assert sum(d["unit_bytes"]) == 4 * n - sum(p.numel() * 4 for p in model.head.parameters())


# --------------------------------------------------------------------------- statistics


def test_median_ci95_order_statistics():
    med, lo, hi, cov = comm.median_ci95(list(range(10, 0, -1)))
    assert (med, lo, hi) == (5.5, 2, 9)
    assert cov == pytest.approx(1 - 2 * 11 / 1024)  # P(Bin(10, 1/2) <= 1) = 11/1024
    med, lo, hi, cov = comm.median_ci95([3.0, 1.0, 2.0])
    assert (med, lo, hi) == (2.0, 1.0, 3.0) and cov == pytest.approx(0.75)
    with pytest.raises(ValueError):
        comm.median_ci95([])


@pytest.mark.parametrize("collective", comm.COLLECTIVES)
def test_fit_alpha_beta_recovers_the_ring_parameters(collective):
    alpha, beta, p = 20e-6, 1 / 5e9, 4
    sizes = comm.default_sizes(16 * comm.MIB)
    times = [comm.collective_time(collective, n, p, alpha, beta) for n in sizes]
    fit = comm.fit_alpha_beta(collective, p, sizes, times)
    assert fit["alpha_s"] == pytest.approx(alpha, rel=1e-6)
    assert fit["beta_s_per_byte"] == pytest.approx(beta, rel=1e-6)
    assert fit["bandwidth_gb_s"] == pytest.approx(5.0, rel=1e-6)
    assert fit["rel_rmse"] < 1e-9


def test_ring_factors_and_bad_inputs():
    assert comm.ring_factors("all_reduce", 4) == (6.0, 1.5)
    assert comm.ring_factors("all_gather", 4) == (3.0, 0.75)
    assert comm.collective_time("all_reduce", 1e9, 1, 1.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="unknown"):
        comm.ring_factors("broadcast", 2)
    with pytest.raises(ValueError, match="two different"):
        comm.fit_alpha_beta("all_reduce", 2, [4096, 4096], [1e-4, 1e-4])
    with pytest.raises(ValueError, match=">= 2"):
        comm.fit_alpha_beta("all_reduce", 1, [1, 2], [1.0, 2.0])


def test_load_commbench_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="launch/commbench.py"):
        comm.load_commbench(tmp_path)
    (tmp_path / "commbench.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(ValueError, match="not a commbench result"):
        comm.load_commbench(tmp_path)


# --------------------------------------------------------------------------- measuring


@pytest.mark.multiproc
def test_spawn_commbench_on_two_gloo_workers():
    res = comm.spawn_commbench(2, timeout_s=120, sizes=[4096, 1 << 18],
                               bucket_bytes=[100_000], repeats=4, warmup=1)
    assert res["backend"] == "gloo" and res["world_size"] == 2
    assert set(res["collectives"]) == set(comm.COLLECTIVES)
    for c in res["collectives"].values():
        kinds = [q["kind"] for q in c["points"]]
        assert kinds == ["grid", "grid", "bucket"]
        # sizes round to whole fp32 elements that split over the workers
        assert c["points"][2]["bytes"] == 100_000 // 8 * 8
        for q in c["points"]:
            assert len(q["times_s"]) == 4 and all(t > 0 for t in q["times_s"])
            assert q["ci95_lo_s"] <= q["median_s"] <= q["ci95_hi_s"]
        assert c["fit"]["alpha_s"] >= 0 and c["fit"]["beta_s_per_byte"] >= 0
    stamped = comm.stamp(res, [{"label": "m", "ddp_buckets": [100_000]}])
    model = stamped["models"][0]
    assert model["ddp_allreduce_measured_s"] == \
        res["collectives"]["all_reduce"]["points"][2]["median_s"]
    assert math.isfinite(model["ddp_allreduce_fit_s"])


# Slow (10 s): commbench under torchrun runs in CI through the headline sweep (test_headline).
@pytest.mark.slow
@pytest.mark.multiproc
def test_commbench_cli_plain_python_and_under_torchrun(tmp_path):
    args = ["--depths", "2", "--sizes", "4096,65536", "--repeats", "3"]
    plain = subprocess.run([sys.executable, SCRIPT, "--workers", "2", "--out",
                            str(tmp_path / "plain"), *args], env=_env(), capture_output=True,
                           text=True, timeout=180)
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-2000:]
    assert "all_reduce" in plain.stdout and "DDP buckets" in plain.stdout
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                          f"--master-port={free_port()}", SCRIPT, "--out",
                          str(tmp_path / "trun"), *args], env=_env(), capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for sub in ("plain", "trun"):
        res = comm.load_commbench(tmp_path / sub)
        assert res["world_size"] == 2 and (tmp_path / sub / "commbench.png").is_file()
        assert res["models"][0]["label"] == "modern u16-32 six"
        assert "ddp_allreduce_measured_s" in res["models"][0]


def test_commbench_cli_rejects_one_worker(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--workers", "1", "--out", str(tmp_path)],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "at least 2" in proc.stderr


def test_commbench_for_sweep_with_one_worker_records_why(tmp_path):
    path = comm.commbench_for_sweep(tmp_path, 1, [("modern", (16, 32), "six")])
    data = json.loads(path.read_text())
    assert path.name == "commbench.json" and "skipped" in data
    assert data["models"][0]["params"] > 0


@pytest.mark.multiproc
def test_spawn_commbench_ignores_a_parent_launchers_rendezvous(monkeypatch, tmp_path):
    # What a worker of `torchrun launch/sweep.py` inherits: a store at MASTER_PORT that
    # nobody serves to the benchmark's workers (they hung there for 180 s).
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                 "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "x",
                 "CROSS_SIZE": "1", "LOCAL_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    log = tmp_path / "commbench.log"
    res = comm.spawn_commbench(2, timeout_s=60, log_path=log, sizes=[4096, 65536],
                               bucket_bytes=[], repeats=2, warmup=1)
    assert res["world_size"] == 2 and set(res["collectives"]) == set(comm.COLLECTIVES)


@pytest.mark.multiproc
def test_a_failing_worker_is_one_line_naming_its_error_and_the_log(tmp_path):
    log = tmp_path / "commbench.log"
    with pytest.raises(comm.CommbenchError) as e:
        comm.spawn_commbench(2, timeout_s=60, log_path=log, sizes=[4096], bogus=1)
    msg = str(e.value)
    assert "\n" not in msg and "TypeError" in msg and "bogus" in msg and str(log) in msg
    assert "Traceback" in log.read_text()  # the whole traceback went to the log


def test_a_failed_measurement_is_recorded_and_the_report_says_why(tmp_path, monkeypatch):
    from segcore.scaling.report import report_section

    def fail(*a, **k):
        raise comm.CommbenchError("worker 1: RuntimeError: connection refused")

    monkeypatch.setattr(comm, "spawn_commbench", fail)
    with pytest.raises(comm.CommbenchError):
        comm.commbench_for_sweep(tmp_path, 2, [("modern", (16, 32), "six")])
    data = comm.load_commbench(tmp_path)
    assert data["failed"].endswith("connection refused") and data["log"] == "commbench.log"
    row = {"status": "ok", "run_id": "r", "world_size": 1, "device_type": "cpu", "engine": "ddp",
           "step_ms_p50": 10.0, "throughput_img_s": 100.0, "batch_size": 1}
    text = report_section([row], tmp_path, tmp_path)
    assert "could not be measured" in text and "connection refused" in text
    assert "commbench.log" in text and not (tmp_path / "scaling_model.png").exists()
