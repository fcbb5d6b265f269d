"""Full-resolution prediction and flood outputs (segcore.predict, launch/predict.py).

Exactness end to end: :func:`colour_checkpoint` writes a *real* U-Net checkpoint whose
weights are set by hand so that it classifies each pixel by its red value (the skip path
carries the red channel through 1x1-centred identity convolutions; the head's logits
``2 c_k v - c_k^2`` peak at the class whose code ``c_k`` is nearest to the value ``v``;
the deeper level and the up path are zero, so tile borders change nothing). Photos
whose red channel encodes a scene with known class counts then go through the CLI
(tiling, blending, blocks, files) and the reported fractions and C must equal the hand
computation from the documented coefficient tables.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from segcore.config import DataConfig, ModelConfig, RunConfig
from segcore.data.classes import scheme as make_scheme
from segcore.data.dataset import MEAN, STD, normalize_image as normalize, to_tensor
from segcore.data.images import read_truth
from segcore.data.layouts import DatasetError
from segcore.model.unet import build_model
from segcore.predict.blocks import plan_blocks, predict_classes, tile_normalizer
from segcore.predict.tiles import predict_image, predict_tiled, tile_grid
from segcore.train.checkpoint import save_checkpoint as save_checkpoint_atomic

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_predict", REPO / "launch" / "predict.py")
launcher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launcher)

# (low, typical, high) per class, copied from the tables in segcore/predict/flood.py's docstring
# (None = unknown surface): the expected values below are computed from these by hand.
COEF = {
    "six": {"unlabeled": None, "paved-area": (0.70, 0.85, 0.95), "dirt": (0.20, 0.45, 0.70),
            "grass": (0.05, 0.20, 0.35), "roof": (0.75, 0.85, 0.95), "water": (1, 1, 1)},
    "binary": {"rest": (0.05, 0.30, 1.00), "paved-area": (0.70, 0.85, 0.95)},
    "full": {"paved-area": (0.70, 0.85, 0.95), "grass": (0.05, 0.20, 0.35),
             "gravel": (0.35, 0.50, 0.70), "roof": (0.75, 0.85, 0.95),
             "tree": (0.05, 0.15, 0.25), "water": (1, 1, 1), "pool": (1, 1, 1),
             "person": None, "car": (0.70, 0.85, 0.95)},
}
SURFACE = {"paved-area": "impervious", "roof": "impervious", "car": "impervious",
           "water": "water", "pool": "water"}
# Class -> pixel count of the main test scene (96 x 160 = 15360 pixels).
SCENES = {
    "six": {"paved-area": 7680, "grass": 3840, "roof": 1920, "unlabeled": 960, "water": 960},
    "binary": {"paved-area": 5000, "rest": 10360},
    "full": {"paved-area": 4000, "grass": 3000, "gravel": 1500, "roof": 2500, "tree": 1360,
             "water": 1000, "pool": 500, "person": 700, "car": 800},
}
H, W = 96, 160


def red_code(sch, k: int) -> int:
    """Red value that encodes class index k (spaced as widely as the class count allows)."""
    step = 240 // sch.num_classes
    return 8 + step * k


def value_of(red: int) -> float:
    """The network's internal value for a red level: normalized red + 3 (always > 0)."""
    return (red / 255.0 - MEAN[0]) / STD[0] + 3.0


def colour_checkpoint(path: Path, scheme_name: str, widths=(8, 16), norm="none",
                      channels_last=True) -> Path:
    """A real modern U-Net checkpoint that labels each pixel by its red value exactly."""
    cfg = RunConfig(model=ModelConfig(arch="modern", widths=widths, norm=norm,
                                      channels_last=channels_last),
                    data=DataConfig(class_scheme=scheme_name, image_size=64))
    sch = make_scheme(scheme_name)
    model = build_model(cfg.model, sch.num_classes, binary=sch.is_binary)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # eval: x / sqrt(1 + eps), ~identity
                m.weight.fill_(1.0)
        first, second = model.down[0][0], model.down[0][3]
        first.weight[0, 0, 1, 1] = 1.0  # channel 0 = red (normalized) + 3 > 0: ReLU passes it
        if first.bias is not None:
            first.bias[0] = 3.0
        else:  # batch norm: its shift adds the 3 (its 1/sqrt(1 + eps) scale is ~1e-5 off,
            model.down[0][1].bias[0] = 3.0  # far below the half spacing of the codes)
        second.weight[0, 0, 1, 1] = 1.0
        dec = model.dec[-1]  # last decoder block: input is cat([skip, up]); skip ch 0 = v
        dec[0].weight[0, 0, 1, 1] = 1.0
        dec[3].weight[0, 0, 1, 1] = 1.0
        codes = torch.tensor([value_of(red_code(sch, k)) for k in range(sch.num_classes)])
        if sch.is_binary:  # one logit, positive (paved-area) above the midpoint
            model.head.weight[0, 0] = 1.0
            model.head.bias[0] = -float(codes.mean())
        else:  # 2 c v - c^2: largest for the code nearest to v
            model.head.weight[:, 0, 0, 0] = 2 * codes
            model.head.bias[:] = -codes ** 2
    save_checkpoint_atomic({"engine": {"model": model.state_dict()}, "epoch": 3,
                            "config": cfg.to_dict(), "class_names": list(sch.names)}, path)
    return path


def random_checkpoint(path: Path, scheme_name: str, widths=(8, 16), seed=0) -> Path:
    cfg = RunConfig(model=ModelConfig(widths=widths),
                    data=DataConfig(class_scheme=scheme_name))
    sch = make_scheme(scheme_name)
    torch.manual_seed(seed)
    model = build_model(cfg.model, sch.num_classes, binary=sch.is_binary)
    save_checkpoint_atomic({"engine": {"model": model.state_dict()}, "epoch": 0,
                            "config": cfg.to_dict(), "class_names": list(sch.names)}, path)
    return path


def scene(scheme_name: str, counts: dict[str, int], shape=(H, W), seed=0):
    """(photo, mask): exactly counts[name] pixels per class, shuffled pixel by pixel, so
    every pixel sits next to other classes; green/blue are noise the model must ignore."""
    sch = make_scheme(scheme_name)
    flat = np.concatenate([np.full(n, sch.names.index(c), np.uint8) for c, n in counts.items()])
    assert flat.size == shape[0] * shape[1]
    rng = np.random.default_rng(seed)
    rng.shuffle(flat)
    mask = flat.reshape(shape)
    photo = rng.integers(0, 256, size=shape + (3,), dtype=np.uint8)
    photo[..., 0] = np.array([red_code(sch, k) for k in range(sch.num_classes)],
                             np.uint8)[mask]
    return photo, mask


def expected(scheme_name: str, counts: dict[str, int]) -> dict[str, float]:
    """Fractions and composite C by hand, from COEF."""
    total = sum(counts.values())
    known = {c: n for c, n in counts.items() if COEF[scheme_name][c] is not None}
    nk = sum(known.values())
    imp = sum(n for c, n in known.items() if SURFACE.get(c) == "impervious")
    wat = sum(n for c, n in known.items() if SURFACE.get(c) == "water")
    out = {"pixels": total, "unknown_fraction": (total - nk) / total,
           "impervious_fraction": imp / nk, "water_fraction": wat / nk,
           "pervious_fraction": (nk - imp - wat) / nk}
    for i, name in enumerate(("C_low", "C_typical", "C_high")):
        out[name] = sum(n * COEF[scheme_name][c][i] for c, n in known.items()) / nk
    return out


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = launcher.main([*map(str, args), "--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def read_csv(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "surface_stats.csv").set_index("image")


# ----------------------------------------------------------------------- exactness


def test_tile_normalizer_matches_training_exactly():
    """Tiles normalized on the device, batch by batch, are bitwise the training input."""
    img = np.random.default_rng(0).integers(0, 256, (2, 7, 9, 3), dtype=np.uint8)
    batch = tile_normalizer("cpu")(torch.from_numpy(img).permute(0, 3, 1, 2))
    assert batch.dtype == torch.float32 and batch.shape == (2, 3, 7, 9)
    for k in range(2):
        ref, _ = to_tensor(img[k], np.zeros((7, 9), np.uint8))
        assert torch.equal(batch[k], ref)


@pytest.mark.parametrize("scheme_name", ["six", "binary", "full"])
def test_cli_fractions_and_c_are_exact(tmp_path, capsys, scheme_name):
    """End to end through the CLI, a real (hand-set) checkpoint, tiles, blending and
    several blocks: every pixel is classified right, so the numbers are exact."""
    counts = SCENES[scheme_name]
    photo, mask = scene(scheme_name, counts)
    small_counts = {next(iter(counts)): 48 * 32}  # a second, small, one-class image
    photo2, mask2 = scene(scheme_name, small_counts, shape=(48, 32), seed=1)
    imgs, truth = tmp_path / "imgs", tmp_path / "truth"
    save_png(imgs / "scene.png", photo)
    save_png(imgs / "small.png", photo2)
    save_png(truth / "scene.png", mask)
    save_png(truth / "small.png", mask2)
    ckpt = colour_checkpoint(tmp_path / "c.pt", scheme_name)
    out = tmp_path / "out"
    # tile 32 (< both sides), 25 % overlap, and a block budget of a few tile rows.
    rc, stdout, err = run_cli(capsys, "--checkpoint", ckpt, "--images", imgs, "--out", out,
                              "--tile", 32, "--overlap", 0.25, "--batch-size", 3,
                              "--truth", truth, "--max-block-mb", 0.15)
    assert rc == 0, err
    assert "Traceback" not in err
    assert len(plan_blocks(H, W, 32, 0.25, 1 if scheme_name == "binary" else
                           make_scheme(scheme_name).num_classes, 0.15)) > 1

    got = np.asarray(Image.open(out / "scene_classes.png"))
    np.testing.assert_array_equal(got, mask)
    df = read_csv(out)
    exp = expected(scheme_name, counts)
    row = df.loc["scene.png"]
    for key, value in exp.items():
        assert row[key] == pytest.approx(value, abs=1e-12), key
    for name, n in counts.items():
        assert row[f"frac.{name}"] == pytest.approx(n / exp["pixels"], abs=1e-12)
    assert row["pixel_accuracy"] == 1.0
    assert row["impervious_fraction_err"] == 0.0 and row["C_typical_err"] == 0.0
    # ALL is area-weighted: the hand computation over both images' pixels together.
    both = dict(counts)
    for c, n in small_counts.items():
        both[c] = both.get(c, 0) + n
    exp_all = expected(scheme_name, both)
    for key, value in exp_all.items():
        assert df.loc["ALL", key] == pytest.approx(value, abs=1e-12), key
    mean_of_ratios = (row["C_typical"] + df.loc["small.png", "C_typical"]) / 2
    assert df.loc["ALL", "C_typical"] != pytest.approx(mean_of_ratios, abs=1e-6)
    assert df.loc["ALL", "images"] == 2 and list(df.index)[-1] == "ALL"
    assert f"C {exp_all['C_typical']:.3f}" in stdout


def test_six_scene_numbers_by_hand(tmp_path, capsys):
    """The six-class scene spelled out: 50 % paved, 25 % grass, 12.5 % roof, 6.25 %
    unlabeled, 6.25 % water."""
    photo, mask = scene("six", SCENES["six"])
    save_png(tmp_path / "imgs" / "a.png", photo)
    ckpt = colour_checkpoint(tmp_path / "c.pt", "six", widths=(8, 16, 32), norm="batch")
    rc, _, err = run_cli(capsys, "--checkpoint", ckpt, "--images", tmp_path / "imgs",
                         "--out", tmp_path / "out", "--tile", 64, "--overlap", 0.5)
    assert rc == 0, err
    r = read_csv(tmp_path / "out").loc["a.png"]
    assert r["unknown_fraction"] == pytest.approx(0.0625, abs=1e-12)
    assert r["impervious_fraction"] == pytest.approx(9600 / 14400, abs=1e-12)
    assert r["water_fraction"] == pytest.approx(960 / 14400, abs=1e-12)
    assert r["C_typical"] == pytest.approx(9888 / 14400, abs=1e-12)
    assert r["C_low"] == pytest.approx(7968 / 14400, abs=1e-12)
    assert r["C_high"] == pytest.approx(11424 / 14400, abs=1e-12)


def test_truth_errors_and_pixel_accuracy(tmp_path, capsys):
    """Truth differing from the prediction: errors are prediction - truth, ignored
    truth pixels are left out of the accuracy and counted."""
    photo, mask = scene("six", SCENES["six"])
    truth = mask.copy()
    paved = np.flatnonzero(truth.ravel() == 1)
    truth.ravel()[paved[:1000]] = 3  # 1000 paved pixels are grass in the truth
    truth.ravel()[paved[1000:1360]] = 255  # 360 ignored
    save_png(tmp_path / "imgs" / "a.png", photo)
    save_png(tmp_path / "truth" / "a.png", truth)
    ckpt = colour_checkpoint(tmp_path / "c.pt", "six")
    rc, _, err = run_cli(capsys, "--checkpoint", ckpt, "--images", tmp_path / "imgs",
                         "--out", tmp_path / "out", "--tile", 64, "--truth", tmp_path / "truth")
    assert rc == 0, err
    r = read_csv(tmp_path / "out").loc["a.png"]
    assert r["pixel_accuracy"] == pytest.approx((15360 - 360 - 1000) / (15360 - 360))
    assert r["truth_ignored_pixels"] == 360
    # truth: known 14400 - 360, impervious 9600 - 1360
    assert r["truth_impervious_fraction"] == pytest.approx(8240 / 14040)
    assert r["impervious_fraction_err"] == pytest.approx(9600 / 14400 - 8240 / 14040)
    assert r["truth_unknown_fraction"] == pytest.approx((960 + 360) / 15360)


def test_truth_kind_sdd_remaps_24_class_labels(tmp_path):
    sch = make_scheme("six")
    labels = np.array([[0, 1, 2, 3], [4, 5, 9, 255]], np.uint8)  # gravel->dirt, roof
    p = save_png(tmp_path / "m.png", labels)
    np.testing.assert_array_equal(read_truth(p, sch, "sdd"),
                                  [[0, 1, 2, 3], [2, 5, 4, 255]])
    with pytest.raises(DatasetError, match="--truth-kind sdd"):
        read_truth(p, sch, "target")


# ------------------------------------------------------------------ tiling / blocks


def position_model(channels: int = 5):
    """A model whose output depends on the tile-local position: blending and seams show,
    so a block that received other tiles or weights than the whole image would differ."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        t = x.shape[-1]
        ramp = torch.sin(torch.arange(t, dtype=torch.float32) * 0.37)
        outs = [x[:, k % 3] * (1 + k) + (k - 2) * ramp[None, :, None] * ramp[None, None, :]
                for k in range(channels)]
        return torch.stack(outs, 1)
    return fn


@pytest.mark.parametrize("h, w, tile, overlap", [
    (100, 150, 16, 0.25), (61, 203, 16, 0.5), (90, 70, 16, 0.8), (40, 300, 16, 0.0),
    (130, 17, 16, 0.25), (10, 10, 16, 0.25),
])
@pytest.mark.parametrize("budget_mb", [0.01, 0.06, 1000.0])
def test_blocks_equal_whole_image_predict_tiled(h, w, tile, overlap, budget_mb):
    """Block-wise prediction reproduces one whole-image predict_tiled call exactly."""
    rng = np.random.default_rng(h * w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    fn = position_model()
    blocks = plan_blocks(h, w, tile, overlap, 5, budget_mb)
    cover = np.zeros((h, w), np.int32)
    for b in blocks:
        cover[b.ky0:b.ky1, b.kx0:b.kx1] += 1
        assert b.y0 <= b.ky0 < b.ky1 <= b.y1 and b.x0 <= b.kx0 < b.kx1 <= b.x1
    assert (cover == 1).all()  # kept regions partition the image
    whole = predict_image(fn, normalize(img), 5, tile=tile, overlap=overlap).numpy()
    done = []
    got = predict_classes(fn, img, 5, tile=tile, overlap=overlap, batch_size=3,
                          max_block_mb=budget_mb, progress=lambda d, t: done.append((d, t)))
    np.testing.assert_array_equal(got, whole)
    assert done[-1][0] == done[-1][1] == sum(b.tiles for b in blocks)


def test_block_plan_for_full_size_photos():
    """Six classes: a 6000x4000 photo is one block (no recomputed tiles); the full scheme
    takes a few strips with a bounded share of recomputed tiles."""
    n_tiles = len(tile_grid(4000, 6000, 512, 0.25))
    six = plan_blocks(4000, 6000, 512, 0.25, 6, 1024)
    assert len(six) == 1 and six[0].tiles == n_tiles
    full = plan_blocks(4000, 6000, 512, 0.25, 24, 1024)
    assert 1 < len(full) <= 6
    assert sum(b.tiles for b in full) <= 1.2 * n_tiles
    per_px = 4 * 25 + 4  # accumulator + weight map, uint8 input + class map
    assert max((b.y1 - b.y0) * (b.x1 - b.x0) for b in full) * per_px <= 1024 * 2 ** 20
    wide = plan_blocks(512, 60000, 512, 0.25, 24, 256)  # too wide for a strip: columns
    assert len({b.x0 for b in wide}) > 1


def test_one_host_copy_per_block(monkeypatch):
    """The blend stays on the model's device: one device -> host copy (the uint8 class
    map) per block, not one per batch of tiles; every batch the model sees is float."""
    img = np.random.default_rng(5).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    blocks = plan_blocks(100, 150, 16, 0.25, 5, 0.06)
    batches = -(-max(b.tiles for b in blocks) // 3)
    assert len(blocks) > 1 and batches > 1  # copies per batch would outnumber blocks
    copies, seen = [], []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *a, **k):
        copies.append((self.dtype, tuple(self.shape)))
        return real_cpu(self, *a, **k)

    def fn(x):
        seen.append(x.dtype)
        return position_model()(x)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    got = predict_classes(fn, img, 5, tile=16, overlap=0.25, batch_size=3, max_block_mb=0.06)
    monkeypatch.undo()
    assert len(copies) == len(blocks)
    assert [c[1] for c in copies] == [(b.ky1 - b.ky0, b.kx1 - b.kx0) for b in blocks]
    assert all(c[0] == torch.uint8 for c in copies) and set(seen) == {torch.float32}
    whole = predict_image(position_model(), normalize(img), 5, tile=16, overlap=0.25)
    np.testing.assert_array_equal(got, whole.numpy())


def receptive_radius(model, size=96) -> int:
    """How far (px) a one-pixel change travels in the output: measured, not assumed
    (at four pixel parities, since max-pooling makes it depend on the position)."""
    radius = 0
    with torch.no_grad():
        base = model(torch.zeros(1, 3, size, size))
        for dy, dx in ((0, 0), (1, 1), (0, 1), (1, 0)):
            x = torch.zeros(1, 3, size, size)
            cy, cx = size // 2 + dy, size // 2 + dx
            x[0, :, cy, cx] = 5.0
            diff = (model(x) - base).abs().amax(dim=(0, 1)) > 0
            ys, xs = torch.nonzero(diff, as_tuple=True)
            radius = max(radius, int((ys - cy).abs().max()), int((xs - cx).abs().max()))
    return radius


def test_tiled_equals_untiled_real_unet(tmp_path):
    """A random tiny U-Net (eval mode): tiled == untiled to float precision wherever
    every covering tile gives the pixel its full receptive field; near seams the tiles
    lack context, so only there may they differ.

    The tolerance: outside seams both sides compute the same convolutions on the same
    inputs; only the blend (a weighted mean of equal numbers) and batch composition
    change the float rounding, far below 1e-4 for logits of order 1."""
    from segcore.predict.model import load_model

    ckpt = random_checkpoint(tmp_path / "r.pt", "six", widths=(8, 16, 32))
    model = load_model(ckpt).model
    R = receptive_radius(model)
    assert 8 <= R <= 40  # depth-3 modern U-Net: about 2 + 1 + 4 + 2 + 8 + 4 + 2 px
    h, w, tile, overlap = 160, 224, 96, 0.25
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    x = normalize(img)
    with torch.no_grad():
        ref = model(x[None].contiguous(memory_format=torch.channels_last))[0]
    tiled = predict_tiled(model, x, 6, tile=tile, overlap=overlap, channels_last=True)
    # Pixels within R of a tile edge that is inside the image see padding, not context.
    seam = np.zeros((h, w), bool)
    for y0, x0 in tile_grid(h, w, tile, overlap):
        sub = np.zeros((tile, tile), bool)
        if y0 > 0:
            sub[:R] = True
        if y0 + tile < h:
            sub[-R:] = True
        if x0 > 0:
            sub[:, :R] = True
        if x0 + tile < w:
            sub[:, -R:] = True
        seam[y0:y0 + tile, x0:x0 + tile] |= sub
    clean = ~seam
    assert clean.mean() > 0.25  # the check covers a real share of the image
    diff = (tiled - ref).abs().amax(dim=0).numpy()
    assert diff[clean].max() < 1e-4
    # The class map through the CLI path (blocks included) agrees on the clean pixels.
    classes = predict_classes(model, img, 6, tile=tile, overlap=overlap, channels_last=True,
                              max_block_mb=0.5)
    np.testing.assert_array_equal(classes[clean], ref.argmax(0).numpy()[clean])
    # One tile covering the whole image is exactly the untiled model.
    sq = img[:96, :96]
    one = predict_classes(model, sq, 6, tile=96, overlap=0.25, channels_last=True)
    with torch.no_grad():
        ref_sq = model(normalize(sq)[None].contiguous(memory_format=torch.channels_last))
    np.testing.assert_array_equal(one, ref_sq[0].argmax(0).numpy())


# ------------------------------------------------------------------ model, package


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "_orig_mod.module."])
def test_wrapped_checkpoint_loads_like_a_plain_one(tmp_path, prefix):
    """Weights saved from a compiled or DDP-wrapped model (prefixed keys) load through
    segcore.train.checkpoint into the plain model; a missing file is a PredictError."""
    from segcore.predict import PredictError
    from segcore.predict.model import load_model

    plain = random_checkpoint(tmp_path / "plain.pt", "six")
    state = torch.load(plain, weights_only=True)
    state["engine"]["model"] = {prefix + k: v for k, v in state["engine"]["model"].items()}
    save_checkpoint_atomic(state, tmp_path / "wrapped.pt")
    a, b = load_model(plain).model, load_model(tmp_path / "wrapped.pt").model
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(PredictError, match=r"checkpoint .*nope\.pt does not exist"):
        load_model(tmp_path / "nope.pt")


def test_package_import_is_light_and_reexports_lazily():
    code = ("import sys, segcore.predict as p; "
            "heavy = [m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "from segcore.predict.tiles import predict_tiled; "
            "from segcore.predict.folder import predict_checkpoint; "
            "assert p.predict_tiled is predict_tiled; "
            "assert p.predict_checkpoint is predict_checkpoint; "
            "assert 'pandas' not in sys.modules and 'matplotlib' not in sys.modules; "
            "assert issubclass(p.PredictError, ValueError)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    import segcore.predict as pkg

    with pytest.raises(AttributeError, match="no_such_name"):
        pkg.no_such_name


# ----------------------------------------------------------------------- outputs


def test_outputs_and_formats(tmp_path, capsys):
    photo, mask = scene("six", SCENES["six"])
    save_png(tmp_path / "imgs" / "a.png", photo)
    Image.fromarray(photo[:64, :96]).save(tmp_path / "imgs" / "b.jpg", quality=95)
    ckpt = random_checkpoint(tmp_path / "r.pt", "six")
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "--checkpoint", ckpt, "--images", tmp_path / "imgs",
                         "--out", out, "--tile", 64, "--overlay-max-side", 80)
    assert rc == 0, err
    for stem, (h, w) in (("a", (H, W)), ("b", (64, 96))):
        cls = Image.open(out / f"{stem}_classes.png")
        assert cls.mode == "L" and cls.size == (w, h)
        col = Image.open(out / f"{stem}_color.png")
        assert col.mode == "RGB" and col.size == (w, h)
        np.testing.assert_array_equal(np.asarray(col),
                                      make_scheme("six").colorize(np.asarray(cls)))
        ov = Image.open(out / f"{stem}_overlay.jpg")
        assert ov.format == "JPEG" and max(ov.size) == 80  # downscaled as asked
    df = pd.read_csv(out / "surface_stats.csv")
    need = ["image", "width", "height", "pixels", "unknown_fraction", "impervious_fraction",
            "pervious_fraction", "water_fraction", "C_low", "C_typical", "C_high",
            *[f"frac.{n}" for n in make_scheme("six").names]]
    assert list(df.columns[:len(need)]) == need
    assert list(df["image"]) == ["a.png", "b.jpg", "ALL"]
    assert df.iloc[-1]["pixels"] == H * W + 64 * 96
    doc = json.loads((out / "surface_stats.json").read_text())
    assert doc["complete"] is True and doc["images_done"] == 2 and doc["images_skipped"] == 0
    assert doc["scheme"] == "six" and doc["all"]["image"] == "ALL"
    assert doc["properties"]["grass"]["c"] == [0.05, 0.2, 0.35]
    with Image.open(out / "summary.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_binary_threshold_moves_the_boundary(tmp_path, capsys):
    """Binary: one sigmoid logit; a higher threshold marks fewer pixels paved."""
    photo, _ = scene("binary", SCENES["binary"])
    save_png(tmp_path / "imgs" / "a.png", photo)
    ckpt = random_checkpoint(tmp_path / "r.pt", "binary", seed=3)
    fr = []
    for th in (0.2, 0.5, 0.8):
        out = tmp_path / f"o{th}"
        rc, _, err = run_cli(capsys, "--checkpoint", ckpt, "--images", tmp_path / "imgs",
                             "--out", out, "--tile", 64, "--threshold", th)
        assert rc == 0, err
        fr.append(read_csv(out).loc["a.png", "frac.paved-area"])
    assert fr[0] >= fr[1] >= fr[2] and fr[0] > fr[2]


def test_crash_late_in_a_folder_keeps_earlier_outputs(tmp_path):
    """Files and the stats table are written as each image finishes: a model that dies
    on the third image leaves the first two complete (and progress hooks fired)."""
    from segcore.predict.folder import Hooks, PredictSettings, predict_folder

    imgs = []
    for i in range(3):
        photo, _ = scene("six", SCENES["six"], seed=i)
        imgs.append(save_png(tmp_path / "imgs" / f"{i}.png", photo))
    sch = make_scheme("six")
    calls = {"n": 0}
    n_tiles = len(tile_grid(H, W, 64, 0.25))
    batches = -(-n_tiles // 4)
    codes = torch.tensor([red_code(sch, k) for k in range(6)], dtype=torch.float32)

    def oracle(x: torch.Tensor) -> torch.Tensor:  # decodes the red channel, one-hot
        calls["n"] += 1
        if calls["n"] > 2 * batches:  # dies in the third image
            raise RuntimeError("simulated crash")
        red = (x[:, 0] * STD[0] + MEAN[0]) * 255
        k = (red[:, None] - codes[None, :, None, None]).abs().argmin(1)
        return torch.nn.functional.one_hot(k, 6).permute(0, 3, 1, 2).float()

    events = []
    hooks = Hooks(image_started=lambda i, n, name, t: events.append(("start", name, t)),
                  tiles_done=lambda d, t: events.append(("tiles", d, t)),
                  image_finished=lambda i, n, row: events.append(("done", row["image"])))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict_folder(oracle, sch, imgs, out, num_out_channels=6,
                       settings=PredictSettings(tile=64, overlap=0.25), hooks=hooks)
    assert [e[1] for e in events if e[0] == "done"] == ["0.png", "1.png"]
    assert ("tiles", n_tiles, n_tiles) in events and ("start", "0.png", n_tiles) in events
    df = read_csv(out)
    assert list(df.index) == ["0.png", "1.png", "ALL"]
    assert df.loc["0.png", "C_typical"] == pytest.approx(9888 / 14400, abs=1e-12)
    assert json.loads((out / "surface_stats.json").read_text())["complete"] is False
    for i in (0, 1):
        assert (out / f"{i}_classes.png").is_file() and (out / f"{i}_overlay.jpg").is_file()
    assert not (out / "2_classes.png").exists()


# ---------------------------------------------------------------------- bad input


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def test_corrupt_images_are_reported_and_skipped(tmp_path, capsys):
    photo, _ = scene("six", SCENES["six"])
    imgs = tmp_path / "imgs"
    save_png(imgs / "a_good.png", photo)
    (imgs / "b_garbage.jpg").write_bytes(b"this is not a jpeg")
    Image.fromarray(photo).save(imgs / "c_cut.jpg", quality=90)
    data = (imgs / "c_cut.jpg").read_bytes()
    (imgs / "c_cut.jpg").write_bytes(data[:len(data) // 2])  # truncated mid-scan
    save_png(imgs / "d_good.png", photo[:64, :64])
    (imgs / "notes.txt").write_text("not an image: ignored")
    ckpt = colour_checkpoint(tmp_path / "c.pt", "six")
    out = tmp_path / "out"
    pil_limit = Image.MAX_IMAGE_PIXELS
    rc, stdout, err = run_cli(capsys, "--checkpoint", ckpt, "--images", imgs, "--out", out,
                              "--tile", 64)
    assert rc == 0 and "Traceback" not in err
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # raised per read only, then restored
    skip_lines = [ln for ln in err.splitlines() if ln.startswith("skipped")]
    assert len(skip_lines) == 2
    assert "b_garbage.jpg" in skip_lines[0] and "c_cut.jpg" in skip_lines[1]
    assert "2 skipped" in stdout
    assert (out / "a_good_classes.png").is_file() and (out / "d_good_classes.png").is_file()
    assert list(read_csv(out).index) == ["a_good.png", "d_good.png", "ALL"]
    doc = json.loads((out / "surface_stats.json").read_text())
    assert doc["images_skipped"] == 2 and doc["images_total"] == 4
    assert [s["image"] for s in doc["skipped"]] == ["b_garbage.jpg", "c_cut.jpg"]


def test_all_images_corrupt_exits_nonzero(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(b"garbage")
    (imgs / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ckpt = colour_checkpoint(tmp_path / "c.pt", "six")
    rc, _, err = run_cli(capsys, "--checkpoint", ckpt, "--images", imgs, "--out",
                         tmp_path / "out", "--tile", 64)
    assert rc == 1 and "Traceback" not in err
    assert "error: none of the 2 image(s)" in err


def _bad_cases(tmp_path: Path):
    photo, mask = scene("six", SCENES["six"])
    imgs = tmp_path / "imgs"
    save_png(imgs / "a.png", photo)
    six = colour_checkpoint(tmp_path / "six.pt", "six")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full.toml").write_text('scheme = "full"\n[classes.grass]\nc = [0.1, 0.2, 0.3]\n')
    (tmp_path / "unknown.toml").write_text('[classes.gravel]\nc = [0.1, 0.2, 0.3]\n')
    save_png(tmp_path / "truth24" / "a.png", (mask * 4).astype(np.uint8))  # values up to 20
    save_png(tmp_path / "truth_rgb" / "a.png", photo)
    save_png(tmp_path / "truth_small" / "a.png", mask[:50])
    # weights of a (8, 32) model under a config that says (8, 16)
    cfg = RunConfig(model=ModelConfig(widths=(8, 16)), data=DataConfig(class_scheme="six"))
    wrong = build_model(ModelConfig(widths=(8, 32)), 6)
    save_checkpoint_atomic({"engine": {"model": wrong.state_dict()}, "epoch": 0,
                            "config": cfg.to_dict(),
                            "class_names": list(make_scheme("six").names)},
                           tmp_path / "wrong.pt")
    # a six-class head saved under a full-scheme config
    cfg_full = RunConfig(model=ModelConfig(widths=(8, 16)), data=DataConfig(class_scheme="full"))
    save_checkpoint_atomic({"engine": {"model": build_model(cfg.model, 6).state_dict()},
                            "epoch": 0, "config": cfg_full.to_dict()}, tmp_path / "head.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    base = ["--images", imgs, "--out", tmp_path / "out", "--tile", 64]
    ck = ["--checkpoint", six]
    return {
        "missing checkpoint": (["--checkpoint", tmp_path / "nope.pt", *base], "does not exist"),
        "junk checkpoint": (["--checkpoint", tmp_path / "junk.pt", *base], "cannot be read"),
        "foreign checkpoint": (["--checkpoint", tmp_path / "foreign.pt", *base],
                               "not a segbench training checkpoint"),
        "weights vs config": (["--checkpoint", tmp_path / "wrong.pt", *base],
                              "does not match its saved config"),
        "head vs scheme": (["--checkpoint", tmp_path / "head.pt", *base],
                           "does not match its saved config"),
        "missing images": ([*ck, "--images", tmp_path / "nope", "--out", tmp_path / "o"],
                           "does not exist"),
        "empty images": ([*ck, "--images", tmp_path / "empty", "--out", tmp_path / "o"],
                         "no images"),
        "properties scheme": ([*ck, *base, "--properties", tmp_path / "full.toml"],
                              "'full' but the run uses the 'six'"),
        "properties class": ([*ck, *base, "--properties", tmp_path / "unknown.toml"],
                             "unknown class 'gravel'"),
        "truth values": ([*ck, *base, "--truth", tmp_path / "truth24"],
                         "outside the 'six' scheme"),
        "truth colour": ([*ck, *base, "--truth", tmp_path / "truth_rgb"], "index masks"),
        "truth size": ([*ck, *base, "--truth", tmp_path / "truth_small"], "but image"),
        "truth folder": ([*ck, *base, "--truth", tmp_path / "nope"], "does not exist"),
        "tile": ([*ck, "--images", imgs, "--out", tmp_path / "o", "--tile", 63],
                 "multiples of 2"),
        "overlap": ([*ck, *base, "--overlap", 1.5], "overlap"),
    }


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    for name, (args, needle) in _bad_cases(tmp_path).items():
        rc, _, err = run_cli(capsys, *args)
        assert rc == 2, (name, err)
        line = one_error_line(err)
        assert needle in line, (name, line)
    assert not (tmp_path / "out" / "a_classes.png").exists()  # refused before predicting


def test_out_of_memory_exits_3_with_a_hint(tmp_path, capsys, monkeypatch):
    """An allocation failure while blending (device accumulator) is exit 3, one line."""
    import segcore.predict.blocks as blocks

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(blocks, "blend_tiles", oom)
    photo, _ = scene("six", SCENES["six"])
    save_png(tmp_path / "imgs" / "a.png", photo)
    ckpt = colour_checkpoint(tmp_path / "c.pt", "six")
    rc, _, err = run_cli(capsys, "--checkpoint", ckpt, "--images", tmp_path / "imgs",
                         "--out", tmp_path / "out", "--tile", 64)
    assert rc == 3
    line = one_error_line(err)
    assert "out of memory: CUDA out of memory" in line and "--max-block-mb" in line


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "launch" / "predict.py"), "--checkpoint",
                        str(tmp_path / "none.pt"), "--images", str(tmp_path), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: ") and "Traceback" not in p.stderr


# -------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_full_size_photo_peak_memory_under_4_gib(tmp_path):
    """6000 x 4000 photo, default modern U-Net (16, 32, 64, 128), 24-class ``full``
    scheme (the largest accumulator), in a subprocess: peak RSS < 4 GiB. Overlap 0 keeps
    the run short; it changes the tile count, not the per-block memory."""
    ckpt = random_checkpoint(tmp_path / "m.pt", "full", widths=(16, 32, 64, 128))
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)
    big = np.kron(small, np.ones((10, 10, 1), np.uint8))
    (tmp_path / "imgs").mkdir()
    Image.fromarray(big).save(tmp_path / "imgs" / "big.jpg", quality=90)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run([sys.executable, str(REPO / "launch" / "predict.py"), "--checkpoint",
                        str(ckpt), "--images", str(tmp_path / "imgs"), "--out",
                        str(tmp_path / "out"), "--overlap", "0", "--no-progress"],
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib >= before
    assert peak_kib / 2 ** 20 < 4.0, f"peak RSS {peak_kib / 2 ** 20:.2f} GiB"
    assert Image.open(tmp_path / "out" / "big_classes.png").size == (6000, 4000)


def test_a_per_image_threshold_rule_is_refused_unless_a_cut_is_given(tmp_path, capsys):
    """A checkpoint validated with --pred-threshold median would give every photo the same
    paved share: prediction refuses it in one line, and maps with an explicit cut."""
    photo, _ = scene("binary", SCENES["binary"])
    save_png(tmp_path / "imgs" / "a.png", photo)
    cfg = RunConfig(model=ModelConfig(widths=(8, 16)),
                    data=DataConfig(class_scheme="binary", pred_threshold="median"))
    sch = make_scheme("binary")
    model = build_model(cfg.model, sch.num_classes, binary=True)
    ckpt = tmp_path / "m.pt"
    save_checkpoint_atomic({"engine": {"model": model.state_dict()}, "epoch": 0,
                            "config": cfg.to_dict(), "class_names": list(sch.names)}, ckpt)
    rc, _, err = run_cli(capsys, "--checkpoint", ckpt, "--images", tmp_path / "imgs",
                         "--out", tmp_path / "o", "--tile", 64)
    assert rc == 2 and "--pred-threshold median" in one_error_line(err)
    assert "--threshold" in err and not (tmp_path / "o" / "a_classes.png").exists()
    rc, _, err = run_cli(capsys, "--checkpoint", ckpt, "--images", tmp_path / "imgs",
                         "--out", tmp_path / "o", "--tile", 64, "--threshold", 0.5)
    assert rc == 0, err


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, capsys):
    photo, _ = scene("six", SCENES["six"])
    save_png(tmp_path / "imgs" / "a.png", photo)
    ckpt = random_checkpoint(tmp_path / "r.pt", "six")
    state = torch.load(ckpt, weights_only=True)
    first = next(k for k, v in state["engine"]["model"].items() if v.is_floating_point())
    state["engine"]["model"][first].fill_(float("nan"))
    save_checkpoint_atomic(state, ckpt)
    rc, _, err = run_cli(capsys, "--checkpoint", ckpt, "--images", tmp_path / "imgs",
                         "--out", tmp_path / "o", "--tile", 64)
    assert rc == 2 and "non-finite weights" in one_error_line(err) and "diverged" in err


def test_a_png_whose_data_ends_before_its_header_says_is_skipped(tmp_path, capsys):
    """A header that promises 96x64 with data for 20 rows decoded without error (the rest
    zeros) and was predicted as a whole photo: now one line naming it, and skipped."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    photo, _ = scene("six", SCENES["six"])
    imgs = tmp_path / "imgs"
    save_png(imgs / "a_good.png", photo)
    h, w = photo.shape[:2]
    rows = b"".join(b"\0" + photo[r].tobytes() for r in range(20))
    (imgs / "b_short.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "--checkpoint", colour_checkpoint(tmp_path / "c.pt", "six"),
                         "--images", imgs, "--out", out, "--tile", 64)
    assert rc == 0 and "Traceback" not in err
    skip = [ln for ln in err.splitlines() if ln.startswith("skipped")]
    assert len(skip) == 1 and "b_short.png" in skip[0]
    assert f"holds 20 of the {h} rows" in skip[0]
    assert list(read_csv(out).index) == ["a_good.png", "ALL"]


def test_a_png_with_damaged_data_is_one_line_not_a_traceback(tmp_path):
    import struct
    import zlib

    from segcore.data.images import ImageReadError, read_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2,
                                                                       0, 0, 0))
                     + chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 40) + chunk(b"IEND", b""))
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    assert "\n" not in str(e.value)
