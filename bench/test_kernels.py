"""Data-side kernels: confusion-matrix update, class remap, synthetic scene generation.

These run once per batch or per image in training and evaluation, so a regression in one
of them shows up as data wait or validation time, not in the train-step numbers. Each
benchmark checks its output against an independent reference (the CI run with
``--benchmark-disable`` is a correctness test of the timed code path).

- ``confusion``: :meth:`segcore.metrics.ConfusionMatrix.update` on a 4x512x512 batch of
  predictions and targets (6 classes, ~5 % ignored pixels), on the bench device.
- ``remap``: :meth:`segcore.data.classes.ClassScheme.remap` (24 -> 6 classes) of one
  1024x1536 mask, as uint8 (decoded PNG) and int32 (the cast path).
- ``scene``: :func:`segcore.data.synthetic.generate_scene` at 256x384.
- ``ratio``: the lookup-table remap vs a per-pixel Python loop on a 64x64 patch, timed
  alternately in the same run (a machine-independent ratio, see ``bench/ratios.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcore.data.classes import IGNORE_INDEX, SDD_NAMES, SIX_CLASS_MAP, SIX_NAMES, scheme
from segcore.data.synthetic import generate_scene
from segcore.metrics import ConfusionMatrix

from bench.conftest import BENCH_DEVICE, record, slowdown, sync
from bench.ratios import PairedReference, record_ratio

CM_SHAPE, CM_CLASSES, IGNORE = (4, 512, 512), 6, 255
MASK_SHAPE = (1024, 1536)
SCENE_SHAPE = (256, 384)
PATCH = 64


# --------------------------------------------------------------------------- confusion matrix


def _cm_batch():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, CM_CLASSES, CM_SHAPE, generator=g)
    # Predictions agree with the target on ~70 % of pixels, like a half-trained model.
    noise = torch.randint(0, CM_CLASSES, CM_SHAPE, generator=g)
    pred = torch.where(torch.rand(CM_SHAPE, generator=g) < 0.7, target, noise)
    target[torch.rand(CM_SHAPE, generator=g) < 0.05] = IGNORE
    return pred, target


def _cm_reference(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """numpy, boolean selection instead of the overflow bin: a different code path."""
    p, t = pred.numpy().ravel(), target.numpy().ravel()
    keep = t != IGNORE
    return np.bincount(t[keep] * CM_CLASSES + p[keep],
                       minlength=CM_CLASSES ** 2).reshape(CM_CLASSES, CM_CLASSES)


def test_confusion_update(benchmark):
    n, h, w = CM_SHAPE
    benchmark.group = f"confusion-matrix update {n}x{h}x{w}, {CM_CLASSES} classes"
    pred_cpu, target_cpu = _cm_batch()
    pred, target = pred_cpu.to(BENCH_DEVICE), target_cpu.to(BENCH_DEVICE)

    def update() -> ConfusionMatrix:
        # A fresh accumulator per round, so the result is one batch's counts however
        # many rounds ran (allocating a 6x6 tensor is noise next to 1 M pixels).
        cm = ConfusionMatrix(CM_CLASSES, IGNORE, device=BENCH_DEVICE)
        cm.update(pred, target)
        slowdown()
        sync()
        return cm

    cm = benchmark.pedantic(update, rounds=10, warmup_rounds=2, iterations=1)
    mat = cm.mat.cpu().numpy()
    assert mat.sum() == int((target_cpu != IGNORE).sum())  # every counted pixel, once
    np.testing.assert_array_equal(mat, _cm_reference(pred_cpu, target_cpu))
    record(benchmark, n * h * w, unit="px", shape=list(CM_SHAPE), classes=CM_CLASSES,
           dtype=str(pred.dtype).replace("torch.", ""))


# --------------------------------------------------------------------------- class remap


def _source_mask(shape, dtype) -> np.ndarray:
    """Source labels 0-23 with a few out-of-table values (24, 200, 255) mixed in."""
    rng = np.random.default_rng(0)
    mask = rng.integers(0, len(SDD_NAMES), size=shape, dtype=np.int64)
    bad = rng.random(shape) < 0.01
    mask[bad] = rng.choice([len(SDD_NAMES), 200, 255], size=int(bad.sum()))
    return mask.astype(dtype)


def _remap_reference(mask: np.ndarray) -> np.ndarray:
    """Built from SIX_CLASS_MAP by name, one class at a time: no lookup table involved."""
    out = np.full(mask.shape, IGNORE_INDEX, dtype=np.uint8)
    for src, name in enumerate(SDD_NAMES):
        out[mask == src] = SIX_NAMES.index(SIX_CLASS_MAP[name])
    return out


@pytest.mark.parametrize("dtype", ["uint8", "int32"])
def test_remap(benchmark, dtype):
    h, w = MASK_SHAPE
    benchmark.group = f"class remap 24->6, {h}x{w} mask"
    six = scheme("six")
    mask = _source_mask(MASK_SHAPE, dtype)

    def remap() -> np.ndarray:
        out = six.remap(mask)
        slowdown()
        return out

    out = benchmark.pedantic(remap, rounds=30, warmup_rounds=2, iterations=1)
    assert out.dtype == np.uint8 and out.shape == MASK_SHAPE
    np.testing.assert_array_equal(out, _remap_reference(mask))
    record(benchmark, h * w, unit="px", shape=list(MASK_SHAPE), dtype=dtype, scheme="six",
           device="cpu")


def _python_remap(patch: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """What the reference study did: one dictionary lookup per pixel, in Python."""
    rows = patch.tolist()
    return np.array([[table.get(v, IGNORE_INDEX) for v in row] for row in rows], dtype=np.uint8)


def test_ratio_remap_lut_vs_python(benchmark):
    benchmark.group = f"ratio: class remap {PATCH}x{PATCH}, lookup table / per-pixel Python"
    six = scheme("six")
    patch = _source_mask((PATCH, PATCH), np.uint8)
    table = {i: SIX_NAMES.index(SIX_CLASS_MAP[n]) for i, n in enumerate(SDD_NAMES)}
    ref = PairedReference(lambda: _python_remap(patch, table))

    def lut() -> np.ndarray:
        out = six.remap(patch)
        slowdown()
        return out

    out = benchmark.pedantic(lut, setup=ref.setup, rounds=40, warmup_rounds=3, iterations=1)
    np.testing.assert_array_equal(out, ref.last)
    np.testing.assert_array_equal(out, _remap_reference(patch))
    record(benchmark, PATCH * PATCH, unit="px", shape=[PATCH, PATCH], device="cpu")
    entry = record_ratio(benchmark, ref, f"remap {PATCH}x{PATCH}: LUT / Python loop",
                         "six.remap (LUT)", "per-pixel Python dict lookup")
    if entry is not None:
        # A lookup table that is not far faster than a Python loop means remap fell back
        # to per-pixel work; a generous bound, so a noisy machine does not trip it.
        assert entry["median"] < 0.5, entry


# --------------------------------------------------------------------------- synthetic scenes


def test_generate_scene(benchmark):
    h, w = SCENE_SHAPE
    benchmark.group = f"synthetic scene {h}x{w}"
    expected_img, expected_mask = generate_scene(7, h, w)

    def scene():
        out = generate_scene(7, h, w)
        slowdown()
        return out

    img, mask = benchmark.pedantic(scene, rounds=10, warmup_rounds=1, iterations=1)
    assert img.shape == (h, w, 3) and img.dtype == np.uint8
    assert mask.shape == (h, w) and mask.dtype == np.uint8
    assert int(mask.max()) < len(SDD_NAMES)  # only labels from the dataset's table
    assert len(np.unique(mask)) >= 3  # a scene, not a blank canvas
    # Deterministic per seed: what write_dataset's cache relies on.
    np.testing.assert_array_equal(img, expected_img)
    np.testing.assert_array_equal(mask, expected_mask)
    record(benchmark, 1, unit="img", shape=[h, w], px_per_image=h * w, device="cpu")
