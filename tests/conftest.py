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
