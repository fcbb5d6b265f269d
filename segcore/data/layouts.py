"""Dataset discovery: find image/mask pairs in the folder layouts people have.

:func:`discover` returns a :class:`DatasetIndex`, the one object the loaders use to list
samples and to read an image or a mask already remapped to a class scheme.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from segcore.data.classes import INVALID, SDD_CLASSES, ClassScheme, read_class_csv

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class DatasetError(ValueError):
    """The dataset folder is missing, empty or holds bad files; the message says which."""


@dataclass(frozen=True)
class Sample:
    stem: str
    image: Path
    mask: Path


@dataclass
class DatasetIndex:
    """The pairs found under a dataset root and how to read them.

    Attributes:
        root: the folder given by the user.
        layout: which layout matched (``kaggle``).
        classes: the source class table ``((name, (r, g, b)), ...)`` in index order.
        samples: valid pairs, sorted by stem.
        problems: one line per skipped file or pair (empty when all is well).
    """

    root: Path
    layout: str
    classes: tuple
    samples: list[Sample]
    problems: list[str] = field(default_factory=list)

    def split(self, test_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
        """(train, test) samples: deterministic per seed (see ``split_samples``)."""
        from segcore.data.dataset import split_samples

        return split_samples(self.samples, test_fraction, seed)

    def load_image(self, sample: Sample) -> np.ndarray:
        """RGB uint8 array (H, W, 3)."""
        with Image.open(sample.image) as im:
            return np.asarray(im.convert("RGB"))

    def load_mask(self, sample: Sample, scheme: ClassScheme) -> np.ndarray:
        """Mask remapped to ``scheme`` target indices, uint8 (H, W).

        Raises:
            DatasetError: the mask holds values outside the class table.
        """
        with Image.open(sample.mask) as im:
            src = np.asarray(im)
        if src.ndim == 3:
            src = src[..., 0]
        out = scheme.remap(src)
        if (out == INVALID).any():
            bad = np.unique(src[out == INVALID])[:10].tolist()
            raise DatasetError(
                f"mask {sample.mask} holds value(s) {bad} that are not in the class table "
                f"(0-{len(self.classes) - 1}); fix the mask or the class table, or run "
                "launch/prepare.py without --strict to skip such pairs")
        return out


def _kaggle_dirs(root: Path) -> tuple[Path, Path] | None:
    for base in (root, root / "dataset" / "semantic_drone_dataset",
                 root / "semantic_drone_dataset"):
        img, msk = base / "original_images", base / "label_images_semantic"
        if img.is_dir() and msk.is_dir():
            return img, msk
    return None


def _files_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS}


def discover(root: str | Path, strict: bool = False) -> DatasetIndex:
    """Find the image/mask pairs under ``root``.

    Args:
        root: dataset folder (Kaggle layout: ``original_images/`` and
            ``label_images_semantic/``, optionally under ``dataset/semantic_drone_dataset``).
        strict: raise on any unpaired file instead of skipping it with a warning.

    Raises:
        DatasetError: no such folder, no recognised layout, or no pairs.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; pass --data DIR with the "
                           "Semantic Drone Dataset, or --data synthetic")
    dirs = _kaggle_dirs(root)
    if dirs is None:
        raise DatasetError(f"{root} holds no recognised layout: expected original_images/ "
                           "and label_images_semantic/ (Kaggle Semantic Drone Dataset)")
    img_dir, msk_dir = dirs
    csv = next((p for p in (img_dir.parent / "class_dict_seg.csv",
                            root / "class_dict_seg.csv") if p.is_file()), None)
    classes = read_class_csv(csv) if csv else SDD_CLASSES
    images, masks = _files_by_stem(img_dir), _files_by_stem(msk_dir)
    problems = [f"image without mask: {images[s]}" for s in sorted(set(images) - set(masks))]
    problems += [f"mask without image: {masks[s]}" for s in sorted(set(masks) - set(images))]
    samples = [Sample(s, images[s], masks[s]) for s in sorted(set(images) & set(masks))]
    if problems:
        msg = f"{len(problems)} problem(s) in {root}:\n  " + "\n  ".join(problems)
        if strict:
            raise DatasetError(msg)
        warnings.warn(msg + "\n(skipped; pass --strict to fail instead)", stacklevel=2)
    if not samples:
        raise DatasetError(f"no image/mask pairs found under {root}")
    return DatasetIndex(root, "kaggle", classes, samples, problems)
