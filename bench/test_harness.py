"""segbench's training step against a bare PyTorch loop, timed interleaved in one run.

The bare loop has no segbench code inside its step: the same model (``build_model``),
AdamW, cross-entropy, precision (autocast) and memory format, on the same on-device
batch. The segbench step is the Trainer's own (``Trainer._one_step``: the StepTimer's
marks, the engine's forward/backward/step, the loss kept on the device). The ratio
segbench/bare is the throughput the harness keeps (1.0: it costs nothing). On a CPU the
``tiny`` step makes any per-step host work show; ``default`` is the CPU sweep's model.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from segcore.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from segcore.data.classes import scheme as make_scheme
from segcore.dist import DistContext
from segcore.model import build_model
from segcore.train.engines.base import Engine
from segcore.train.timing import step_timer
from segcore.train.trainer import Trainer, TrainResult

from bench.conftest import BENCH_DEVICE, record, skip_if_emulated, sync
from bench.ratios import PairedReference, record_ratio

# name: (widths, crop, batch) on the CPU; on CUDA the GPU preset's shape.
WORKLOADS = {"tiny": ((8, 16), 32, 2), "default": ((16, 32, 64), 128, 4)}
if BENCH_DEVICE.type == "cuda":
    WORKLOADS = {"default": ((16, 32, 64, 128), 256, 16),
                 "gpu": ((64, 128, 256, 512, 1024), 512, 8)}
STEPS = 5  # optimizer steps per timed round


def _setup(widths, size, batch, precision):
    torch.manual_seed(0)
    mcfg = ModelConfig(widths=widths, channels_last=True)
    model = build_model(mcfg, 6).to(BENCH_DEVICE).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=BENCH_DEVICE).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch, size, size), device=BENCH_DEVICE)
    return mcfg, model, x, y


def bare_loop(model, x, y, precision: str):
    """STEPS plain steps: autocast forward, cross-entropy, backward, AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    dev = BENCH_DEVICE.type

    def run() -> float:
        for _ in range(STEPS):
            with torch.autocast(dev, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        return float(loss.detach())

    return run


def segbench_loop(mcfg, model, x, y, precision: str):
    """STEPS steps of the Trainer's own step on the single engine."""
    cfg = RunConfig(model=mcfg, data=DataConfig(),
                    train=TrainConfig(precision=precision, lr=1e-3, schedule="none",
                                      warmup_steps=0))
    engine = Engine(model, cfg.train, BENCH_DEVICE, total_steps=10_000)
    ctx = DistContext(0, 0, 1, 1, 1, BENCH_DEVICE, None)
    trainer = Trainer(cfg, engine, None, None, make_scheme("six"), ctx)
    timer = step_timer(0, BENCH_DEVICE)
    batches = itertools.repeat((x, y))
    result = TrainResult()

    def run() -> float:
        for _ in range(STEPS):
            loss = trainer._one_step(batches, timer, result)
        sync()
        return float(loss.mean())

    return run


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_ratio_segbench_step_vs_bare_loop(benchmark, workload, precision):
    skip_if_emulated(precision)
    widths, size, batch = WORKLOADS[workload]
    benchmark.group = (f"ratio: segbench step / bare loop ({workload}: widths "
                       f"{'-'.join(map(str, widths))}, {size}px b{batch}, {precision})")
    mcfg, model, x, y = _setup(widths, size, batch, precision)
    bare = bare_loop(model, x, y, precision)
    ours = PairedReference(segbench_loop(mcfg, copy.deepcopy(model), x, y, precision))
    loss = benchmark.pedantic(bare, setup=ours.setup, rounds=7, warmup_rounds=1,
                              iterations=1)
    assert loss == loss and loss > 0 and ours.last == ours.last and ours.last > 0
    record(benchmark, batch * STEPS, workload=workload, precision=precision,
           image=[3, size, size], batch=batch, steps=STEPS)
    # bare time / segbench time = segbench throughput / bare throughput
    entry = record_ratio(benchmark, ours, f"segbench/bare throughput, {workload} "
                         f"{precision}", "bare loop", "segbench step")
    if entry is not None:
        benchmark.extra_info["segbench_over_bare"] = entry["median"]
