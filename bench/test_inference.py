"""Model compute outside the train step's clock: inference forward, and the in-run ratio
of the bf16 channels-last train step to the fp32 NCHW step.

Inference: paper and modern U-Net, fp32 and bf16, one batch through the network as
``segcore.predict.tiles.blend_tiles`` runs it (eval mode, ``torch.inference_mode``, autocast
to the precision, channels-last input and model). 256x256 batch 4 on CPU, 512x512
batch 8 on CUDA, as the train-step benchmarks. Each output is checked against an fp32
NCHW reference forward of the same weights.

Tiled prediction: :func:`segcore.predict.blocks.predict_classes` over a photo-sized
image (1024 x 1536 on CPU, 4000 x 6000 on CUDA) with a 1x1-convolution model, so the
time is the tiling path itself: uint8 upload, per-batch normalization, blending on the
device, logits -> classes, one download per block. Checked against one whole-image
pass (``predict_image``).

Ratio: the train-step benchmark's bf16 channels-last step timed alternately with its
fp32 NCHW step (see ``bench/ratios.py``): how much the production precision/layout
policy buys on this machine, a number that transfers across machines of one kind far
better than either absolute time. (It lives here rather than in ``test_train_step.py``
only to keep that file's benchmarks unchanged.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcore.config import ModelConfig
from segcore.data.dataset import normalize_image
from segcore.model import build_model
from segcore.precision import PrecisionPolicy
from segcore.predict.blocks import predict_classes
from segcore.predict.tiles import predict_image

from bench.conftest import (BENCH_DEVICE, CUDA_MATH, record, skip_if_emulated, slowdown,
                            sync)
from bench.ratios import PairedReference, record_ratio
from bench.test_train_step import make_step

SIZE, BATCH = (512, 8) if BENCH_DEVICE.type == "cuda" else (256, 4)
ARCHS = {"paper": (16, 32, 64), "modern": (16, 32, 64, 128)}
CLASSES = 6
# Largest |output - fp32 reference| relative to the reference's largest |value|:
# fp32 differs only by layout and kernel choice; bf16 keeps 8 mantissa bits. With TF32
# (the training's CUDA setting, bench/conftest.py) fp32 convolutions keep 10 mantissa
# bits, and the NCHW reference and the channels-last run round differently.
TF32 = bool(CUDA_MATH and CUDA_MATH["tf32_conv"])
TOLERANCE = {"fp32": 1e-2 if TF32 else 1e-4, "bf16": 5e-2}


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, widths=ARCHS[arch], channels_last=True,
                      norm="none" if arch == "paper" else "batch")
    return build_model(cfg, CLASSES).to(BENCH_DEVICE).eval()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_inference_forward(benchmark, arch, precision):
    skip_if_emulated(precision)
    benchmark.group = f"inference forward {SIZE}px b{BATCH} channels-last"
    model = _model(arch)
    policy = PrecisionPolicy(precision, BENCH_DEVICE.type)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    x = x.to(BENCH_DEVICE)
    with torch.inference_mode():
        reference = model(x.contiguous()).float()  # fp32, NCHW input
    x = x.contiguous(memory_format=torch.channels_last)

    def forward() -> torch.Tensor:
        with torch.inference_mode(), policy.autocast():
            out = model(x)
        slowdown()
        sync()
        return out

    # Warm-up rounds: oneDNN / cuDNN pick and cache their kernels on the first calls.
    out = benchmark.pedantic(forward, rounds=5, warmup_rounds=2, iterations=1)
    assert out.shape == (BATCH, CLASSES, SIZE, SIZE)
    out = out.float()
    assert torch.isfinite(out).all()
    err = float((out - reference).abs().max() / reference.abs().max())
    assert err < TOLERANCE[precision], f"{arch} {precision}: relative error {err:.2e}"
    record(benchmark, BATCH, arch=arch, precision=precision, channels_last=True,
           image=[3, SIZE, SIZE], batch=BATCH, rel_err_vs_fp32=err)


PHOTO, TILE = ((4000, 6000), 512) if BENCH_DEVICE.type == "cuda" else ((1024, 1536), 256)


# Two paths that sum the same tiles in another order (blocks vs one pass; TF32 and cuDNN
# autotuning on a GPU) may pick different classes only where the two most probable ones
# are this close in probability: a tie the model does not decide. Anywhere else they
# must agree exactly.
TIE_TOLERANCE = 1e-3


def assert_classes_match(got: np.ndarray, want: np.ndarray, probs: np.ndarray,
                         tol: float = TIE_TOLERANCE) -> int:
    """``got == want`` except where the top two probabilities (``probs``: [C, H, W]) of
    the reference differ by less than ``tol``; returns the number of such tie pixels."""
    differ = got != want
    if not differ.any():
        return 0
    top2 = np.sort(probs, axis=0)[-2:]
    margin = top2[1] - top2[0]
    real = differ & (margin >= tol)
    assert not real.any(), (f"{int(real.sum())} of {got.size} pixels differ where the "
                            f"top-two margin is >= {tol} (min margin there "
                            f"{float(margin[real].min()):.2e})")
    return int(differ.sum())


def test_tiled_prediction_path(benchmark):
    benchmark.group = f"tiled prediction {PHOTO[0]}x{PHOTO[1]}, tile {TILE}, 1x1 conv"
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, CLASSES, 1).to(BENCH_DEVICE).eval()
    photo = np.random.default_rng(2).integers(0, 256, (*PHOTO, 3), dtype=np.uint8)

    def predict() -> np.ndarray:
        classes = predict_classes(model, photo, CLASSES, tile=TILE, overlap=0.25,
                                  batch_size=BATCH, device=BENCH_DEVICE)
        slowdown()
        return classes  # on the host already: predict_classes synchronizes

    classes = benchmark.pedantic(predict, rounds=3, warmup_rounds=1, iterations=1)
    whole, probs = predict_image(model, normalize_image(photo), CLASSES, tile=TILE,
                                 overlap=0.25, batch_size=BATCH, device=BENCH_DEVICE,
                                 return_probs=True)
    assert_classes_match(classes, whole.numpy(), probs.numpy())
    record(benchmark, PHOTO[0] * PHOTO[1], unit="px", image=[3, *PHOTO], tile=TILE,
           batch=BATCH)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_ratio_train_step_bf16_cl_vs_fp32_nchw(benchmark, arch):
    skip_if_emulated("bf16")
    benchmark.group = f"ratio: train step {SIZE}px b{BATCH}, bf16-cl / fp32-nchw"
    fast = make_step(arch, "bf16", True)
    ref = PairedReference(make_step(arch, "fp32", False))
    loss = benchmark.pedantic(fast, setup=ref.setup, rounds=6, warmup_rounds=1,
                              iterations=1)
    assert loss == loss and loss > 0 and ref.last == ref.last and ref.last > 0
    record(benchmark, BATCH, arch=arch, precision="bf16", channels_last=True,
           image=[3, SIZE, SIZE], batch=BATCH)
    record_ratio(benchmark, ref, f"train step {arch}: bf16-cl / fp32-nchw",
                 "bf16 channels-last step", "fp32 NCHW step")
