"""Dataset discovery and validation over every supported layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segcore.data.classes import IGNORE_INDEX, SDD_CLASSES, scheme
from segcore.data.layouts import (SETTINGS, DatasetError, colors_to_labels, discover,
                                  validate)

from conftest import (SOURCE_LAYOUTS, coded_pair, write_broken_dataset, write_layout,
                      write_pair)

EXPECTED = {  # layout -> (layout name, mask kind, where the class table lies)
    "kaggle": ("kaggle", "index", "class_dict_seg.csv"),
    "kaggle_rgb": ("kaggle", "rgb", "class_dict_seg.csv"),
    "tugraz": ("tugraz", "rgb", "training_set/gt/semantic/class_dict.csv"),
    "plain": ("plain", "index", "classes.csv"),
    "plain_rgb": ("plain", "rgb", "class_dict.csv"),
}


@pytest.mark.parametrize("layout", SOURCE_LAYOUTS)
def test_each_layout_pairs_and_remaps(tmp_path, layout):
    masks = write_layout(tmp_path / layout, layout, n=4)
    idx = discover(tmp_path / layout)
    name, kind, csv = EXPECTED[layout]
    assert (idx.layout, idx.mask_kind) == (name, kind)
    assert idx.class_csv == tmp_path / layout / csv
    assert idx.classes == SDD_CLASSES  # both CSV spellings: "name, r, g, b" and "name,r,g,b"
    assert [s.stem for s in idx.samples] == sorted(masks) and not idx.problems
    for s in idx.samples:
        assert s.image.stem == s.mask.stem == s.stem
        np.testing.assert_array_equal(idx.load_mask(s, scheme("full")), masks[s.stem])
        np.testing.assert_array_equal(idx.load_mask(s, scheme("six")),
                                      scheme("six").lut[masks[s.stem]])
        np.testing.assert_array_equal(idx.load_image(s)[..., 0], masks[s.stem] * 10)


def test_tugraz_class_table_at_root_or_missing(tmp_path):
    write_layout(tmp_path, "tugraz", n=2)
    table = tmp_path / "training_set" / "gt" / "semantic" / "class_dict.csv"
    table.rename(tmp_path / "class_dict.csv")
    assert discover(tmp_path).class_csv == tmp_path / "class_dict.csv"
    (tmp_path / "class_dict.csv").unlink()
    idx = discover(tmp_path)  # the built-in table has the official colours
    assert idx.class_csv is None and idx.classes == SDD_CLASSES
    assert discover(tmp_path / "training_set").layout == "tugraz"  # root one level down


def test_colour_lookup_is_exact_and_flags_unknown_colours():
    rng = np.random.default_rng(0)
    palette = np.array([c for _, c in SDD_CLASSES], dtype=np.uint8)
    labels = rng.integers(0, 24, size=(300, 40))  # > one chunk of rows
    rgb = palette[labels]
    rgb[5, 7] = (1, 2, 3)
    got = colors_to_labels(rgb, SDD_CLASSES)
    ref = np.array([[next((i for i, (_, c) in enumerate(SDD_CLASSES) if c == tuple(px)),
                          IGNORE_INDEX) for px in row] for row in rgb[:8]])  # per-pixel reference
    np.testing.assert_array_equal(got[:8], ref)
    assert got[5, 7] == IGNORE_INDEX
    np.testing.assert_array_equal(np.delete(got.ravel(), 5 * 40 + 7),
                                  np.delete(labels.ravel(), 5 * 40 + 7))


def test_custom_class_table_maps_by_name(tmp_path):
    # A table listing only 3 classes in another order: label 0 = grass, 1 = unlabeled,
    # 2 = paved-area. Schemes are defined over SDD names, so labels map through the name.
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, size=(16, 16), dtype=np.uint8)
    write_pair(tmp_path, "a", np.zeros((16, 16, 3), np.uint8), mask, "images", "masks")
    write_pair(tmp_path, "b", np.zeros((16, 16, 3), np.uint8), mask, "images", "masks")
    (tmp_path / "classes.csv").write_text(
        "name, r, g, b\ngrass, 0, 102, 0\nunlabeled, 0, 0, 0\npaved-area, 128, 64, 128\n")
    idx = discover(tmp_path)
    full = idx.load_mask(idx.samples[0], scheme("full"))
    np.testing.assert_array_equal(full, np.array([3, 0, 1])[mask])
    (tmp_path / "classes.csv").write_text("name, r, g, b\nlava, 1, 1, 1\n")
    with pytest.raises(DatasetError, match="classes.csv.*'lava'.*not Semantic Drone"):
        discover(tmp_path).load_mask(idx.samples[0], scheme("six"))


def test_unpaired_files_both_ways_skipped_with_warning_or_strict(tmp_path):
    write_layout(tmp_path, "kaggle", n=4)
    base = tmp_path / "dataset" / "semantic_drone_dataset"
    (base / "label_images_semantic" / "001.png").unlink()      # image without mask
    (base / "original_images" / "003.png").unlink()            # mask without image
    with pytest.warns(UserWarning, match=r"(?s)2 problem.*image without mask: .*001\.png"
                                         r".*mask without image: .*003\.png.*skipped"):
        idx = discover(tmp_path)
    assert [s.stem for s in idx.samples] == ["000", "002"] and len(idx.problems) == 2
    with pytest.raises(DatasetError, match=r"(?s)image without mask: .*001\.png.*"
                                           r"mask without image: .*003\.png.*--strict"):
        discover(tmp_path, strict=True)


def test_validate_reports_every_problem_with_file_names(tmp_path):
    img, msk = write_broken_dataset(tmp_path)
    idx = discover(tmp_path)  # pairing only: no file opened, nothing to report yet
    assert len(idx.samples) == 8 and not idx.problems
    with pytest.warns(UserWarning, match="5 problem"):
        problems = validate(idx, workers=1)
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert f"corrupt image: {img / '001.jpg'}" in text
    assert f"corrupt image: {img / '002.jpg'}" in text  # truncated: caught by the decode
    assert f"corrupt mask: {msk / '003.png'}" in text
    assert (f"size mismatch: image {img / '004.jpg'} is 64x48 but mask {msk / '004.png'} "
            "is 32x24") in text
    assert f"unknown mask values [30, 99] in {msk / '005.png'}" in text
    assert [s.stem for s in idx.samples] == ["000", "006", "007"]
    assert idx.problems == problems
    idx2 = discover(tmp_path)
    with pytest.raises(DatasetError) as e:
        validate(idx2, strict=True, workers=2)  # the process-pool path reports the same
    for stem in ("001.jpg", "002.jpg", "003.png", "004.png", "005.png"):
        assert stem in str(e.value)
    assert len(idx2.samples) == 8  # strict raises without pruning


@pytest.mark.parametrize("layout", ["tugraz", "plain_rgb"])
def test_unknown_colour_reported(tmp_path, layout):
    write_layout(tmp_path, layout, n=3)
    sample = discover(tmp_path).samples[1]
    mask_path = sample.mask
    rgb = np.asarray(Image.open(mask_path)).copy()
    rgb[0, 0] = (1, 2, 3)
    rgb[1, 1] = (200, 0, 200)
    Image.fromarray(rgb).save(mask_path)
    with pytest.warns(UserWarning, match="unknown mask colours"):
        idx = discover(tmp_path, validate_files=True)
    assert [s.stem for s in idx.samples] == ["000", "002"]
    assert idx.problems == [f"unknown mask colours [(1, 2, 3), (200, 0, 200)] in {mask_path} "
                            "(not in the class table; 2 pixels)"]
    with pytest.raises(DatasetError, match=r"unknown mask colours \[\(1, 2, 3\)"):
        discover(tmp_path, strict=True, validate_files=True)
    with pytest.raises(DatasetError, match="001.png holds colour"):
        discover(tmp_path).load_mask(sample, scheme("six"))


def test_plain_layout_detects_index_masks_and_duplicate_stems(tmp_path):
    write_layout(tmp_path, "plain", n=3)
    assert discover(tmp_path).mask_kind == "index"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "images" / "001.jpg")
    with pytest.warns(UserWarning, match=r"2 images share the stem '001'"):
        idx = discover(tmp_path)
    assert [s.stem for s in idx.samples] == ["000", "002"]


def test_clear_errors_for_wrong_folders(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no recognised layout.*original_images.*"
                                           "training_set.*images/ \\+ masks/"):
        discover(tmp_path / "empty")
    (tmp_path / "half" / "images").mkdir(parents=True)
    (tmp_path / "half" / "masks").mkdir()
    with pytest.raises(DatasetError, match="no image/mask pairs"):
        discover(tmp_path / "half")
    (tmp_path / "half" / SETTINGS).write_text(json.dumps({"format": "segbench-cache"}))
    with pytest.raises(DatasetError, match="unfinished prepare run.*re-run launch/prepare"):
        discover(tmp_path / "half")


def test_coded_pair_kaggle_flat_layout_still_works(coded_dataset):
    idx = discover(coded_dataset)  # original_images/ directly under the root
    assert idx.layout == "kaggle" and len(idx.samples) == 12
    image, mask = coded_pair(np.random.default_rng(0), 48, 64)
    np.testing.assert_array_equal(idx.load_mask(idx.samples[0], scheme("full")), mask)
