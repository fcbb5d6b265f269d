"""Sliding-window inference (segcore.predict.tiles)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from segcore.config import ModelConfig
from segcore.metrics import logits_to_pred
from segcore.model.unet import build_model
from segcore.predict.tiles import (blend_tiles, logits_to_classes, predict_image,
                                   predict_tiled, tile_grid, window_2d)

REPO = Path(__file__).resolve().parents[1]


def pointwise(cin=3, cout=5, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, 1).eval()


def three_conv(cout=6, seed=0) -> nn.Module:
    """3 same-padded 3x3 convolutions: receptive radius 3 px, so tile borders matter."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, cout, 3, padding=1)).eval()


def untiled(model, image):
    with torch.no_grad():
        return model(image[None])[0]


# ------------------------------------------------------------------------- tile grid


@pytest.mark.parametrize("H, W, tile, overlap", [
    (512, 512, 512, 0.25), (513, 700, 512, 0.25), (3000, 2000, 512, 0.25),
    (100, 37, 64, 0.5), (64, 65, 64, 0), (1, 1, 8, 0.25), (10, 300, 64, 16),
    (129, 257, (32, 48), 0.9), (97, 31, 7, 6),
])
def test_tile_grid_covers_every_pixel_in_bounds(H, W, tile, overlap):
    th, tw = tile if isinstance(tile, tuple) else (tile, tile)
    origins = tile_grid(H, W, tile, overlap)
    assert len(set(origins)) == len(origins)
    cover = np.zeros((H, W), np.int32)
    for y, x in origins:
        assert 0 <= y and y + min(th, H) <= H and 0 <= x and x + min(tw, W) <= W
        cover[y:y + th, x:x + tw] += 1
    assert cover.min() >= 1
    ys, xs = sorted({y for y, _ in origins}), sorted({x for _, x in origins})
    assert ys[0] == 0 and xs[0] == 0
    assert ys[-1] == max(H - th, 0) and xs[-1] == max(W - tw, 0)  # flush with the edge
    ov_y = overlap if isinstance(overlap, int) else round(overlap * th)
    ov_x = overlap if isinstance(overlap, int) else round(overlap * tw)
    assert all(b - a <= th - ov_y for a, b in zip(ys, ys[1:]))  # at least the overlap
    assert all(b - a <= tw - ov_x for a, b in zip(xs, xs[1:]))
    assert len(origins) == len(ys) * len(xs)


def test_tile_grid_counts_and_bad_arguments():
    assert tile_grid(100, 50, 512) == [(0, 0)]
    assert tile_grid(1024, 512, 512, 0) == [(0, 0), (512, 0)]
    assert len(tile_grid(3000, 2000, 512, 0.25)) == 8 * 5
    for bad in (1.0, -0.1, 512, -1, True, "0.25"):
        with pytest.raises(ValueError, match="overlap"):
            tile_grid(1000, 1000, 512, bad)
    with pytest.raises(ValueError, match="tile"):
        tile_grid(100, 100, 0)
    with pytest.raises(ValueError, match="tile"):
        tile_grid(100, 100, (64, 64, 64))


def test_window_has_a_positive_floor():
    w = window_2d(64, 48)
    assert w.shape == (64, 48) and w.dtype == torch.float32
    assert w.min() >= 0.05 ** 2 - 1e-7 and w.max() <= 1.0
    assert w[32, 24] > 10 * w[0, 0]  # border pixels count much less than the centre
    assert torch.equal(window_2d(8, 8, "flat"), torch.ones(8, 8))
    with pytest.raises(ValueError, match="floor"):
        window_2d(8, 8, floor=0.0)


# -------------------------------------------------------------------------- blending


@pytest.mark.parametrize("window", ["hann", "triangle", "flat"])
@pytest.mark.parametrize("tile, overlap", [(64, 0.25), ((48, 80), 10), (32, 0.5)])
def test_pointwise_model_tiled_equals_untiled(window, tile, overlap):
    torch.manual_seed(1)
    image = torch.randn(3, 150, 230)
    model = pointwise()
    out = predict_tiled(model, image, 5, tile=tile, overlap=overlap, batch_size=3,
                        window=window)
    assert out.shape == (5, 150, 230) and out.dtype == torch.float32
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, untiled(model, image), atol=1e-5, rtol=0)


def _safe_axis(length: int, origins: list[int], tile: int, r: int) -> np.ndarray:
    """Pixels whose receptive field (radius r) lies inside every tile covering them,
    except where it leaves the image (zero padding there is the same as untiled)."""
    safe = np.ones(length, bool)
    p = np.arange(length)
    for o in origins:
        inside = (p >= o) & (p < o + tile)
        bad = np.zeros(length, bool)
        if o > 0:
            bad |= p - o < r
        if o + tile < length:
            bad |= (o + tile - 1) - p < r
        safe &= ~(inside & bad)
    return safe


def test_conv_net_tiled_matches_untiled_away_from_seams():
    torch.manual_seed(2)
    H, W, tile, overlap, r = 160, 224, 64, 16, 3  # r: 3 layers of 3x3
    image = torch.randn(3, H, W)
    model = three_conv()
    ref = untiled(model, image)
    out = predict_tiled(model, image, 6, tile=tile, overlap=overlap, batch_size=4)
    origins = tile_grid(H, W, tile, overlap)
    safe = np.outer(_safe_axis(H, sorted({y for y, _ in origins}), tile, r),
                    _safe_axis(W, sorted({x for _, x in origins}), tile, r))
    safe = torch.from_numpy(safe)
    assert 0.5 < safe.float().mean() < 1.0  # the test has seams to look at
    # Where every covering tile saw the whole receptive field, blending averages
    # identical values: exact up to float rounding.
    diff = (out - ref).abs()
    assert diff[:, safe].max() <= 1e-5
    # At seams the only error is the down-weighted border of one tile.
    agree = (out.argmax(0) == ref.argmax(0)).float().mean().item()
    assert agree >= 0.99
    scale = ref.std().item()
    assert diff.max() <= 0.5 * scale  # the blend never produces an outright wrong logit
    # The smooth window is why seams are mild: plain averaging errs more at seams.
    flat = predict_tiled(model, image, 6, tile=tile, overlap=overlap, window="flat")
    assert diff[:, ~safe].mean() < (flat - ref).abs()[:, ~safe].mean()


def test_image_smaller_than_tile():
    torch.manual_seed(3)
    model = pointwise()
    for shape in ((37, 50), (1, 9), (40, 200), (5, 1)):
        image = torch.randn(3, *shape)
        out = predict_tiled(model, image, 5, tile=64)
        assert out.shape == (5, *shape)
        torch.testing.assert_close(out, untiled(model, image), atol=1e-5, rtol=0)
    # A modern U-Net needs sides that are multiples of 4 (depth 3): padding to the tile
    # makes any size work.
    unet = build_model(ModelConfig(arch="modern", widths=(8, 16, 32), channels_last=False),
                       6).eval()
    out = predict_tiled(unet, torch.randn(3, 37, 50), 6, tile=64)
    assert out.shape == (6, 37, 50) and torch.isfinite(out).all()


def test_progress_counts_and_batches():
    calls, seen = [], []

    def model_fn(batch):
        seen.append(tuple(batch.shape))
        return batch[:, :2] * 2

    image = torch.randn(3, 130, 200)
    predict_tiled(model_fn, image, 2, tile=48, overlap=0.25, batch_size=5,
                  progress=lambda done, total: calls.append((done, total)))
    total = len(tile_grid(130, 200, 48, 0.25))
    assert calls[-1] == (total, total)
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(set(done)) == len(done)
    assert all(t == total for _, t in calls)
    assert all(s[0] <= 5 and s[1:] == (3, 48, 48) for s in seen)
    assert sum(s[0] for s in seen) == total


def test_predict_image_multiclass_and_binary():
    torch.manual_seed(4)
    image = torch.randn(3, 70, 90)
    model = three_conv(cout=6)
    logits = predict_tiled(model, image, 6, tile=32)
    classes, probs = predict_image(model, image, 6, tile=32, return_probs=True)
    assert classes.dtype == torch.uint8 and classes.shape == (70, 90)
    assert torch.equal(classes, logits.argmax(0).to(torch.uint8))
    torch.testing.assert_close(probs.sum(0), torch.ones(70, 90))
    assert torch.equal(predict_image(model, image, 6, tile=32), classes)

    def binary(batch):  # logit = red channel: class 1 where sigmoid(red) > threshold
        return batch[:, :1]

    cls, p = predict_image(binary, image, 1, tile=32, threshold=0.7, return_probs=True)
    assert p.shape == (1, 70, 90)
    assert torch.equal(cls, (torch.sigmoid(image[0]) > 0.7).to(torch.uint8))


@pytest.mark.parametrize("channels", [1, 4])
def test_logits_to_classes_is_logits_to_pred_in_row_chunks(channels):
    """600 rows span three 256-row chunks; the map is metrics.logits_to_pred's, as uint8."""
    logits = torch.randn(channels, 600, 7, generator=torch.Generator().manual_seed(6))
    got = logits_to_classes(logits, threshold=0.3)
    assert got.dtype == torch.uint8 and got.shape == (600, 7)
    assert torch.equal(got.long(), logits_to_pred(logits[None], threshold=0.3)[0])
    with pytest.raises(ValueError, match="uint8"):
        logits_to_classes(torch.zeros(257, 2, 2))


def test_transform_runs_on_each_batch_on_the_device():
    """A uint8 image with a transform gives what the pre-transformed float image gives."""
    raw = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(7))
    model = three_conv()
    seen = []

    def scale(batch):
        seen.append(batch.dtype)
        return batch.float() / 255.0

    got = blend_tiles(model, raw, 6, tile=32, batch_size=3, device="cpu", transform=scale)
    assert set(seen) == {torch.uint8}
    torch.testing.assert_close(got, predict_tiled(model, raw.float() / 255.0, 6, tile=32),
                               atol=0, rtol=0)
    with pytest.raises(ValueError, match="float"):
        blend_tiles(model, raw, 6, tile=32)  # uint8 without a transform


def test_options_channels_last_and_autocast():
    torch.manual_seed(5)
    image = torch.randn(3, 96, 80)
    model = three_conv()
    ref = predict_tiled(model, image, 6, tile=48)
    cl = predict_tiled(model.to(memory_format=torch.channels_last), image, 6, tile=48,
                       channels_last=True)
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)
    bf = predict_tiled(model, image, 6, tile=48, autocast_dtype=torch.bfloat16)
    assert bf.dtype == torch.float32
    # bf16 keeps ~3 significant digits: compare against the logit scale.
    assert (bf - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_result_is_an_ordinary_tensor():
    out = predict_tiled(pointwise(), torch.randn(3, 20, 20), 5, tile=16)
    assert not out.is_inference()
    out.mul_(2)  # in-place use outside inference mode works


def test_bad_calls_raise():
    image = torch.randn(3, 40, 40)
    model = three_conv()
    with pytest.raises(ValueError, match="eval"):
        predict_tiled(model.train(), image, 6, tile=32)
    model.eval()
    with pytest.raises(ValueError, match="expected"):
        predict_tiled(model, image, 5, tile=32)  # model returns 6 channels
    with pytest.raises(ValueError, match="image"):
        predict_tiled(model, image[0], 6, tile=32)
    with pytest.raises(ValueError, match="batch_size"):
        predict_tiled(model, image, 6, tile=32, batch_size=0)


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    from torch import nn
    from segcore.predict.tiles import predict_tiled

    torch.set_num_threads(2)
    H, W, C, T, B = 3000, 2000, 4, 512, 4
    model = nn.Conv2d(3, C, 3, padding=1).eval()
    image = torch.randn(3, H, W)
    # Warm up on a 2x2-tile image so one-off allocations land in the baseline.
    predict_tiled(model, torch.randn(3, 800, 800), C, tile=T, batch_size=B)
    biggest = []
    def fn(batch):
        biggest.append(batch.shape[0])
        return model(batch)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = predict_tiled(fn, image, C, tile=T, overlap=0.25, batch_size=B)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json.dump({"growth_kib": peak - base, "shape": list(out.shape),
               "max_batch": max(biggest), "tiles": sum(biggest),
               "finite": bool(torch.isfinite(out).all())}, sys.stdout)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB on Linux")
def test_large_image_bounded_memory():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True,
                         text=True, env=env, timeout=120, check=True)
    r = json.loads(res.stdout)
    H, W, C = 3000, 2000, 4
    assert r["shape"] == [C, H, W] and r["finite"]
    assert r["max_batch"] <= 4 and r["tiles"] == 40
    acc_mib = (C + 1) * H * W * 4 / 2**20  # output + weight map: 114 MiB
    # One batch in flight (input 12.6 MiB, output 16.8 MiB, conv workspace) fits in
    # 80 MiB; holding all 40 tiles' inputs and outputs at once would add ~280 MiB.
    assert r["growth_kib"] / 1024 < acc_mib + 80, r
