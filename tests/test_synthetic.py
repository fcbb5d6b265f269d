"""The procedural aerial-scene generator and the synthetic dataset writer."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from segcore.data.classes import SDD_CLASSES, SIX_NAMES, read_class_csv, scheme
from segcore.data.synthetic import (MARKER, default_root, generate_scene, scene_seed,
                                    write_dataset)


def test_same_seed_same_scene_different_seed_different():
    a_img, a_mask = generate_scene(3, 64, 96)
    b_img, b_mask = generate_scene(3, 64, 96)
    c_img, c_mask = generate_scene(4, 64, 96)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_mask, c_mask)


def test_does_not_touch_global_rng():
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    generate_scene(0, 48, 64)
    np.testing.assert_array_equal(np.random.get_state()[1], state)


@pytest.mark.parametrize("h,w", [(32, 32), (64, 48), (48, 64), (96, 128), (17, 23)])
def test_shapes_dtypes_and_label_range(h, w):
    img, mask = generate_scene(1, h, w)
    assert img.shape == (h, w, 3) and img.dtype == np.uint8
    assert mask.shape == (h, w) and mask.dtype == np.uint8
    assert int(mask.max()) < len(SDD_CLASSES)
    assert img.std() > 5  # a picture, not a flat fill


def test_six_class_coverage_over_a_few_scenes():
    six = scheme("six")
    counts = np.zeros(len(SIX_NAMES))
    shares = []
    for seed in range(8):
        _, mask = generate_scene(seed, 96, 128)
        assert int(mask.max()) <= 23
        target = six.remap(mask)
        c = np.bincount(target.ravel(), minlength=len(SIX_NAMES))
        assert c.size == len(SIX_NAMES)  # no IGNORE_INDEX values
        counts += c
        shares.append(c / target.size)
    assert (counts > 0).all(), dict(zip(SIX_NAMES, counts))
    mean = np.mean(shares, axis=0)
    for name in ("paved-area", "dirt", "grass", "roof", "water"):
        assert mean[SIX_NAMES.index(name)] > 0.04, (name, mean)
    assert mean[SIX_NAMES.index("unlabeled")] < 0.05  # clutter stays small


def test_write_dataset_layout(tmp_path):
    root = write_dataset(tmp_path / "syn", n_images=3, height=40, width=56, seed=2)
    assert root == tmp_path / "syn"
    imgs = sorted(p.name for p in (root / "original_images").iterdir())
    masks = sorted(p.name for p in (root / "label_images_semantic").iterdir())
    assert imgs == ["000.jpg", "001.jpg", "002.jpg"]
    assert masks == ["000.png", "001.png", "002.png"]
    for i in range(3):
        image, mask = generate_scene(scene_seed(2, i), 40, 56)
        with Image.open(root / "label_images_semantic" / f"{i:03d}.png") as im:
            assert im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), mask)
        with Image.open(root / "original_images" / f"{i:03d}.jpg") as im:
            assert im.format == "JPEG" and im.size == (56, 40)
            assert np.abs(np.asarray(im.convert("RGB")).astype(int) - image).mean() < 12
    assert read_class_csv(root / "class_dict_seg.csv") == SDD_CLASSES
    marker = json.loads((root / MARKER).read_text())
    assert marker["n_images"] == 3 and marker["seed"] == 2
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_written_dataset_is_discovered(tmp_path):
    from segcore.data.layouts import discover

    root = write_dataset(tmp_path / "syn", n_images=4, height=32, width=32)
    index = discover(root, strict=True)
    assert [s.stem for s in index.samples] == ["000", "001", "002", "003"]
    assert index.classes == SDD_CLASSES


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_write_dataset_is_idempotent(tmp_path):
    root = write_dataset(tmp_path / "syn", n_images=3, height=32, width=48)
    before = _mtimes(root)
    time.sleep(0.02)
    assert write_dataset(root, n_images=3, height=32, width=48) == root
    assert _mtimes(root) == before


def test_write_dataset_regenerates_on_changed_params(tmp_path):
    root = write_dataset(tmp_path / "syn", n_images=3, height=32, width=48, seed=0)
    old_mask = np.asarray(Image.open(root / "label_images_semantic" / "000.png"))
    write_dataset(root, n_images=2, height=32, width=48, seed=1)
    assert sorted(p.name for p in (root / "original_images").iterdir()) == ["000.jpg", "001.jpg"]
    assert sorted(p.name for p in (root / "label_images_semantic").iterdir()) == \
        ["000.png", "001.png"]
    new_mask = np.asarray(Image.open(root / "label_images_semantic" / "000.png"))
    np.testing.assert_array_equal(new_mask, generate_scene(scene_seed(1, 0), 32, 48)[1])
    assert not np.array_equal(old_mask, new_mask)
    assert json.loads((root / MARKER).read_text())["seed"] == 1


def test_write_dataset_repairs_missing_file(tmp_path):
    root = write_dataset(tmp_path / "syn", n_images=2, height=32, width=32)
    (root / "original_images" / "001.jpg").unlink()
    write_dataset(root, n_images=2, height=32, width=32)
    assert (root / "original_images" / "001.jpg").is_file()


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGBENCH_CACHE", str(tmp_path))
    assert default_root(80, 256, 384, 0) == tmp_path / "synthetic" / "80x256x384-s0"
    monkeypatch.delenv("SEGBENCH_CACHE")
    p = default_root(8, 64, 96, 3)
    assert p.name == "8x64x96-s3" and p.parent.name == "synthetic"
    assert ".cache" in p.parts and "segbench" in p.parts
