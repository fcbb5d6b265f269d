"""What the hardware allows: emulated precision and oversubscription, said and recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segcore.host import oversubscription, parallel_limit, usable_cores
from segcore.precision import native_precision

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags,precision,native", [
    ("avx2 fma", "bf16", False),          # an AVX2-only CPU emulates bf16
    ("avx2 avx512f avx512_bf16", "bf16", True),
    ("avx2 amx_bf16", "bf16", True),
    ("avx2 avx512_bf16", "fp16", False),
    ("avx2", "fp32", True),
])
def test_native_precision_reads_the_cpu_flags(monkeypatch, flags, precision, native):
    monkeypatch.setenv("SEGBENCH_CPU_FLAGS", flags)
    got, why = native_precision(precision, "cpu")
    assert got is native and why


def test_oversubscription_compares_workers_x_threads_with_the_cores():
    cores = usable_cores()
    assert oversubscription(1, cores) == ""
    why = oversubscription(cores + 1, 1)
    assert f"> {cores} usable core(s)" in why
    assert parallel_limit(1) == cores and parallel_limit(1, gpus=4) == 4
    assert oversubscription(3, 1, gpus=2) == "3 workers share 2 visible GPU(s)"


def test_an_emulated_precision_is_said_and_recorded(tmp_path):
    env = dict(os.environ, SEGBENCH_CACHE=str(tmp_path / "cache"),
               SEGBENCH_CPU_FLAGS="avx2 fma")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--image-size",
                        "32", "--widths", "8,16", "--synthetic-images", "24", "--precision",
                        "bf16", "--mode", "throughput", "--steps", "2", "--warmup-steps", "0",
                        "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "warning: bf16 is emulated" in p.stdout
    row = json.loads((out / "result.json").read_text())
    assert row["precision_emulated"] is True and "avx512_bf16" in row["precision_why"]
