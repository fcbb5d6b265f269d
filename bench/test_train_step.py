"""Train-step throughput: paper and modern U-Net, fp32/bf16 x NCHW/channels-last, eager
and torch.compile. 256x256 on CPU (batch 4), 512x512 on CUDA (batch 8).

The timed function is one full optimizer step through the production single-process
engine (forward under the precision policy, loss, backward, optimizer step).
"""

from __future__ import annotations

import pytest
import torch

from segcore.config import ModelConfig, TrainConfig
from segcore.train.engines.base import Engine
from segcore.model import build_model
from segcore.train.losses import segmentation_loss

from bench.conftest import BENCH_DEVICE, record, skip_if_emulated, slowdown, sync

SIZE, BATCH = (512, 8) if BENCH_DEVICE.type == "cuda" else (256, 4)
ARCHS = {"paper": (16, 32, 64), "modern": (16, 32, 64, 128)}
VARIANTS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def make_step(arch: str, precision: str, channels_last: bool, compile_: bool = False):
    torch.manual_seed(0)
    mcfg = ModelConfig(arch=arch, widths=ARCHS[arch], channels_last=channels_last,
                       norm="none" if arch == "paper" else "batch")
    model = build_model(mcfg, 6).to(BENCH_DEVICE)
    if compile_:
        model = torch.compile(model)
    engine = Engine(model, TrainConfig(precision=precision, lr=1e-3, schedule="none"),
                    BENCH_DEVICE, total_steps=1000)
    x = torch.randn(BATCH, 3, SIZE, SIZE, device=BENCH_DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (BATCH, SIZE, SIZE), device=BENCH_DEVICE)

    def step() -> float:
        logits = engine.forward(x)
        loss = segmentation_loss(logits, y, binary=False)
        engine.backward(loss)
        engine.step()
        slowdown()
        sync()
        return float(loss.detach())

    return step


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("precision,channels_last", VARIANTS,
                         ids=[f"{p}-{'cl' if c else 'nchw'}" for p, c in VARIANTS])
def test_train_step(benchmark, arch, precision, channels_last):
    skip_if_emulated(precision)
    benchmark.group = f"train-step {arch} {SIZE}px b{BATCH}"
    step = make_step(arch, precision, channels_last)
    loss = benchmark.pedantic(step, rounds=5, warmup_rounds=2, iterations=1)
    assert loss == loss and loss > 0  # finite, positive cross-entropy
    record(benchmark, BATCH, arch=arch, precision=precision, channels_last=channels_last,
           image=[3, SIZE, SIZE], batch=BATCH)


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_train_step_compile(benchmark, compile_):
    if compile_ and BENCH_DEVICE.type == "cpu":
        pytest.importorskip("torch._inductor")
    benchmark.group = f"train-step compile modern {SIZE}px b{BATCH}"
    step = make_step("modern", "fp32", True, compile_=compile_)
    loss = benchmark.pedantic(step, rounds=5, warmup_rounds=3, iterations=1)
    assert loss == loss and loss > 0
    record(benchmark, BATCH, arch="modern", compiled=compile_, image=[3, SIZE, SIZE],
           batch=BATCH)
