"""Energy per image: the counters (RAPL on a CPU, NVML on a GPU) and the row's columns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segcore.train import energy as E


def _zone(root: Path, name: str, uj: int, top: int = 1000_000_000) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "energy_uj").write_text(str(uj))
    (z / "max_energy_range_uj").write_text(str(top))
    return z


def test_rapl_packages_are_summed_and_a_wrap_is_undone(tmp_path, monkeypatch):
    p0 = _zone(tmp_path, "intel-rapl:0", 900_000_000)
    _zone(tmp_path, "intel-rapl:1", 5_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 123)  # a sub-domain: inside package 0 already
    monkeypatch.setenv("SEGBENCH_RAPL_ROOT", str(tmp_path))
    c = E.EnergyCounter(torch.device("cpu"))
    assert c.source == "rapl" and c.why is None
    a = c.read()
    (p0 / "energy_uj").write_text(str(50_000_000))  # wrapped past 1000 J: +150 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text(str(7_000_000))  # +2 J
    assert c.read() - a == pytest.approx(152.0)


def test_no_counter_says_why_in_one_word(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBENCH_RAPL_ROOT", str(tmp_path / "none"))
    c = E.EnergyCounter(torch.device("cpu"))
    assert (c.source, c.why, c.read()) == (None, "no-rapl", None)
    z = tmp_path / "bad" / "intel-rapl:0"
    z.mkdir(parents=True)
    (z / "energy_uj").write_text("x")
    monkeypatch.setenv("SEGBENCH_RAPL_ROOT", str(tmp_path / "bad"))
    assert E.EnergyCounter(torch.device("cpu")).why == "unreadable"


def test_a_run_records_joules_per_image_over_its_timed_window(tmp_path, monkeypatch):
    from segcore.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from segcore.train import run as run_mod

    class Counter:  # 3 J per read: one read at each end of the window
        source, why = "rapl", None

        def __init__(self, device):
            self.j = 100.0

        def read(self):
            self.j += 3.0
            return self.j

    monkeypatch.setattr(run_mod, "EnergyCounter", Counter)
    monkeypatch.setenv("SEGBENCH_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(model=ModelConfig(widths=(8, 16), norm="group"),
                    data=DataConfig(image_size=32, synthetic_images=12),
                    train=TrainConfig(local_batch_size=2, warmup_steps=1, measure_steps=2),
                    mode="throughput", out=str(tmp_path / "run"))
    row = run_mod.run(cfg, log=lambda m: None)
    # read when warm-up ends and at the end: 3 J over the 2 measured steps of 2 images
    assert row["energy_j_per_img"] == pytest.approx(3.0 / 4)
    assert row["energy_source"] == "rapl" and row["energy_why"] is None
