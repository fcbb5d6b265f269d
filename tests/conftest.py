"""Shared fixtures: tiny datasets written in the real dataset's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcore.data.classes import write_class_csv


def write_pair(root: Path, stem: str, image: np.ndarray, mask: np.ndarray,
               img_dir="original_images", mask_dir="label_images_semantic",
               ext=".png") -> None:
    (root / img_dir).mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / img_dir / f"{stem}{ext}")
    Image.fromarray(mask).save(root / mask_dir / f"{stem}.png")


def coded_pair(rng: np.random.Generator, h: int, w: int, n_classes: int = 24):
    """An image whose red channel encodes the mask (value * 10): alignment is checkable
    after any crop or flip; a blocky mask so flips and crops change it."""
    blocks = rng.integers(0, n_classes, size=(h // 8 + 1, w // 8 + 1), dtype=np.uint8)
    mask = np.kron(blocks, np.ones((8, 8), np.uint8))[:h, :w]
    mask[0, :] = rng.integers(0, n_classes, size=w)  # break symmetry along edges
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = mask * 10
    image[..., 1] = (np.arange(w)[None, :] * 3 % 256).astype(np.uint8)
    image[..., 2] = (np.arange(h)[:, None] * 3 % 256).astype(np.uint8)
    return image, mask


@pytest.fixture
def coded_dataset(tmp_path) -> Path:
    """12 lossless (PNG) pairs of 48x64 whose image encodes the mask, Kaggle layout."""
    rng = np.random.default_rng(0)
    root = tmp_path / "coded"
    for i in range(12):
        image, mask = coded_pair(rng, 48, 64)
        write_pair(root, f"{i:03d}", image, mask)
    write_class_csv(root / "class_dict_seg.csv")
    return root


# -- layouts, prepared caches and DALI (tests/test_layouts.py, test_prepare.py, test_dali.py)

SOURCE_LAYOUTS = ("kaggle", "kaggle_rgb", "tugraz", "plain", "plain_rgb")


def write_layout(root: Path, layout: str, n: int = 6, h: int = 48, w: int = 64,
                 seed: int = 0, ext: str = ".png") -> dict[str, np.ndarray]:
    """A small dataset in one of :data:`SOURCE_LAYOUTS`, with coded images (red = 10 x
    label). Returns the label-index mask written for each stem.

    kaggle:     dataset/semantic_drone_dataset/{original_images,label_images_semantic}/,
                class_dict_seg.csv at the root in the real file's spacing ("name, r, g, b")
    kaggle_rgb: as kaggle, but only RGB_color_image_masks/RGB_color_image_masks/
    tugraz:     training_set/images/, training_set/gt/semantic/label_images/ (RGB colour),
                class_dict.csv in training_set/gt/semantic/ (no spaces, as TU Graz ships it)
    plain:      images/ + masks/ (index PNGs) + classes.csv
    plain_rgb:  images/ + masks/ (RGB colour PNGs) + class_dict.csv
    """
    from segcore.data.classes import SDD_CLASSES

    rng = np.random.default_rng(seed)
    palette = np.array([c for _, c in SDD_CLASSES], dtype=np.uint8)
    base, img_dir, mask_dir, rgb, csv = {
        "kaggle": (root / "dataset" / "semantic_drone_dataset", "original_images",
                   "label_images_semantic", False, root / "class_dict_seg.csv"),
        "kaggle_rgb": (root / "dataset" / "semantic_drone_dataset", "original_images",
                       "../../RGB_color_image_masks/RGB_color_image_masks", True,
                       root / "class_dict_seg.csv"),
        "tugraz": (root / "training_set", "images", "gt/semantic/label_images", True,
                   root / "training_set" / "gt" / "semantic" / "class_dict.csv"),
        "plain": (root, "images", "masks", False, root / "classes.csv"),
        "plain_rgb": (root, "images", "masks", True, root / "class_dict.csv"),
    }[layout]
    masks = {}
    for i in range(n):
        image, mask = coded_pair(rng, h, w)
        stem = f"{i:03d}"
        write_pair(base, stem, image, palette[mask] if rgb else mask, img_dir=img_dir,
                   mask_dir=mask_dir, ext=ext)
        masks[stem] = mask
    csv.parent.mkdir(parents=True, exist_ok=True)
    if layout == "tugraz":  # TU Graz's table has no space after the commas
        csv.write_text("name,r,g,b\n" + "".join(f"{nm},{r},{g},{b}\n"
                                                 for nm, (r, g, b) in SDD_CLASSES))
    else:
        write_class_csv(csv)
    return masks


def id_coded_pair(rng: np.random.Generator, h: int, w: int, sample_id: int):
    """coded_pair with the sample id in the blue channel (constant over the image), so a
    batch element names its source sample whatever the crop or flip."""
    image, mask = coded_pair(rng, h, w)
    image[..., 2] = sample_id
    return image, mask


@pytest.fixture
def id_coded_dataset(tmp_path) -> Path:
    """13 lossless pairs of 48x64 (Kaggle layout): red = 10 x label, green = column code,
    blue = sample id. 13 is odd: 2 ranks cannot split it evenly."""
    rng = np.random.default_rng(1)
    root = tmp_path / "idcoded"
    for i in range(13):
        image, mask = id_coded_pair(rng, 48, 64, i)
        write_pair(root, f"{i:03d}", image, mask)
    write_class_csv(root / "class_dict_seg.csv")
    return root


def write_broken_dataset(root: Path) -> tuple[Path, Path]:
    """8 pairs (Kaggle layout, JPEG images) with every per-file problem once: 001 corrupt
    image, 002 truncated image, 003 corrupt mask, 004 size mismatch, 005 unknown mask
    values (30, 99). Returns (image folder, mask folder)."""
    write_layout(root, "kaggle", n=8, ext=".jpg")
    base = root / "dataset" / "semantic_drone_dataset"
    img, msk = base / "original_images", base / "label_images_semantic"
    (img / "001.jpg").write_bytes(b"not a jpeg at all")
    data = (img / "002.jpg").read_bytes()
    (img / "002.jpg").write_bytes(data[:len(data) // 2])
    data = (msk / "003.png").read_bytes()
    (msk / "003.png").write_bytes(data[:len(data) // 2])
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(msk / "004.png")
    with Image.open(msk / "005.png") as im:
        bad = np.asarray(im).copy()
    bad[3, 4], bad[5, 6] = 30, 99
    Image.fromarray(bad).save(msk / "005.png")
    return img, msk
