"""Class schemes: unlabeled binary, prediction thresholds, class-map files."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcore.config import ConfigError, DataConfig
from segcore.data.classes import (IGNORE_INDEX, SDD_CLASSES, SDD_NAMES, ClassMapError,
                                  binary_predictions, gray_table, load_class_map, scheme,
                                  scheme_for, unlabeled_binary_targets)
from segcore.data.layouts import DatasetError, discover
from segcore.metrics import logits_to_pred

from conftest import write_layout

REPO = Path(__file__).resolve().parents[1]
MAPS = REPO / "configs" / "classmaps"


# -- unlabeled binary ----------------------------------------------------------------------
def reference_unlabeled(mask: np.ndarray, threshold: float) -> np.ndarray:
    """The study's recipe, written out independently: colour label image -> grayscale
    (PIL) -> standardized over the image -> thresholded."""
    palette = np.array([c for _, c in SDD_CLASSES], np.uint8)
    gray = np.asarray(Image.fromarray(palette[mask]).convert("L")).astype(np.float64)
    z = (gray - gray.mean()) / gray.std()
    return (z > threshold).astype(np.uint8)


@pytest.mark.parametrize("threshold", [0.5, 0.0, -0.3])
def test_unlabeled_binary_matches_the_study_recipe(threshold):
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 24, size=(37, 53), dtype=np.uint8)
    sch = scheme("unlabeled-binary", threshold=threshold)
    got = sch.remap(mask)
    np.testing.assert_array_equal(got, reference_unlabeled(mask, threshold))
    assert sch.is_binary and sch.per_image and sch.names == ("dark", "bright")
    assert 0 < got.mean() < 1


def test_unlabeled_binary_default_is_the_code_rule_and_mean_rule_differs():
    rng = np.random.default_rng(2)
    mask = rng.integers(0, 24, size=(40, 40), dtype=np.uint8)
    assert scheme("unlabeled-binary").threshold == 0.5
    code = scheme("unlabeled-binary").remap(mask)
    text = scheme("unlabeled-binary", threshold=0.0).remap(mask)
    assert (text >= code).all() and text.sum() > code.sum()  # a lower cut: more class 1


def test_unlabeled_binary_is_per_image_not_per_label():
    # The same label becomes a different class in a different image: no fixed table.
    roof = SDD_NAMES.index("roof")
    dark = np.full((8, 8), SDD_NAMES.index("unlabeled"), np.uint8)
    dark[:2] = roof
    light = np.full((8, 8), SDD_NAMES.index("bald-tree"), np.uint8)
    light[:2] = roof
    sch = scheme("unlabeled-binary")
    assert sch.remap(dark)[0, 0] == 1 and sch.remap(light)[0, 0] == 0


def test_unlabeled_binary_edge_cases():
    sch = scheme("unlabeled-binary")
    np.testing.assert_array_equal(sch.remap(np.full((4, 5), 3, np.uint8)),
                                  np.zeros((4, 5), np.uint8))  # uniform: z = 0
    mask = np.array([[0, 9, 200], [9, 0, 9]], np.uint8)  # 200: not a label
    got = sch.remap(mask)
    assert got[0, 2] == IGNORE_INDEX
    # The unknown pixel does not enter the statistics.
    np.testing.assert_array_equal(got[1], sch.remap(np.array([[9, 0, 9]], np.uint8))[0])
    table = gray_table()
    assert np.isnan(table[24:]).all()
    assert table[SDD_NAMES.index("paved-area")] == 90  # PIL: 128, 64, 128 -> 90
    assert unlabeled_binary_targets(np.full((2, 2), 250, np.uint8), table).tolist() == \
        [[IGNORE_INDEX] * 2] * 2


def test_unlabeled_binary_reads_the_same_from_index_and_colour_masks(tmp_path):
    masks = write_layout(tmp_path / "idx", "kaggle", n=3)
    write_layout(tmp_path / "rgb", "tugraz", n=3)
    sch = scheme("unlabeled-binary")
    a, b = discover(tmp_path / "idx"), discover(tmp_path / "rgb")
    assert a.target_lut(sch) is None
    for sa, sb in zip(a.samples, b.samples):
        want = reference_unlabeled(masks[sa.stem], 0.5)
        np.testing.assert_array_equal(a.load_mask(sa, sch), want)
        np.testing.assert_array_equal(b.load_mask(sb, sch), want)


# -- prediction thresholds ---------------------------------------------------------------
def test_median_threshold_splits_each_image_in_half():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 10, 12, generator=g) + torch.tensor([-5.0, 0.0, 5.0]).view(3, 1, 1, 1)
    fixed = binary_predictions(logits, "fixed")
    assert fixed[0].sum() < 10 and fixed[2].sum() > 110  # p > 0.5 follows the offset
    med = binary_predictions(logits, "median")
    assert med.shape == (3, 10, 12) and med.dtype == torch.int64
    assert med.flatten(1).sum(1).tolist() == [60, 60, 60]  # an equal share in every image
    mean = binary_predictions(logits, "mean")
    p = logits.sigmoid()[:, 0]
    for i in range(3):
        assert torch.equal(mean[i], (p[i] > p[i].mean()).long())
    assert torch.equal(fixed, logits_to_pred(logits))


def test_scheme_predict_uses_its_rule_and_checks_shapes():
    logits = torch.randn(2, 1, 6, 6)
    assert torch.equal(scheme("unlabeled-binary", pred_threshold="median").predict(logits),
                       binary_predictions(logits, "median"))
    multi = torch.randn(2, 6, 4, 4)
    assert torch.equal(scheme("six").predict(multi), multi.argmax(1))
    with pytest.raises(ValueError, match="one-channel"):
        binary_predictions(multi, "median")
    with pytest.raises(ValueError, match="binary schemes"):
        scheme("six", pred_threshold="mean")
    with pytest.raises(ValueError, match="fixed, median, mean"):
        scheme("binary", pred_threshold="mode")


# -- class maps ------------------------------------------------------------------------------
def test_six_class_file_equals_the_built_in_fold():
    a, b = load_class_map(MAPS / "six.toml"), scheme("six")
    assert (a.names, a.colors) == (b.names, b.colors)
    np.testing.assert_array_equal(a.lut, b.lut)
    assert a.name == "six-map" and not a.is_binary


def test_study_five_class_fold():
    s = load_class_map(MAPS / "study-5.toml")
    six = scheme("six")
    assert s.names == ("unlabeled", "paved-area", "dirt", "grass", "roof")
    for i, name in enumerate(SDD_NAMES):
        folded = six.names[six.lut[i]]
        want = "unlabeled" if folded == "water" else folded  # the six without water
        assert s.names[s.lut[i]] == want, name
    assert (s.lut[24:] == IGNORE_INDEX).all()


GOOD = """name = "mine"
[[classes]]
name = "a"
color = [1, 2, 3]
sources = [{a}]
[[classes]]
name = "b"
color = [4, 5, 6]
sources = [{b}]
"""


def _quoted(names):
    return ", ".join(f'"{n}"' for n in names)


VALID = GOOD.format(a=_quoted(SDD_NAMES[:12]), b=_quoted(SDD_NAMES[12:]))


@pytest.mark.parametrize("text,want", [
    (GOOD.format(a=_quoted(SDD_NAMES[:12]), b=_quoted(SDD_NAMES[12:23])),
     r"source class\(es\) 'conflicting' are not mapped"),
    (GOOD.format(a=_quoted(SDD_NAMES[:12]), b=_quoted(SDD_NAMES[11:])),
     r"source class 'window' is mapped twice \(in 'a' and 'b'\)"),
    (GOOD.format(a=_quoted(SDD_NAMES[:12] + ("lava",)), b=_quoted(SDD_NAMES[12:])),
     r"class 'a': source class 'lava' is not a Semantic Drone Dataset class"),
    (VALID.replace("color = [4, 5, 6]\n", ""), r"class 'b': color = None must be \[r, g, b\]"),
    (VALID.replace("[1, 2, 3]", "[1, 2, 300]"), r"class 'a': color = \[1, 2, 300\]"),
    (VALID.replace('name = "b"\n', ""), r"class #2: needs name"),
    (VALID.replace('name = "b"', 'name = "a"'), r"class 'a' is listed twice"),
    (VALID.replace('name = "mine"', 'name = "six"'), r"built-in scheme's name"),
    (VALID.replace("sources", "source"), r"class 'a': unknown key\(s\) source"),
    ("name = [", r"not valid TOML"),
    ('name = "x"\n', r"needs 2 to 255 \[\[classes\]\]"),
])
def test_class_map_errors_name_the_file_and_the_class(tmp_path, text, want):
    path = tmp_path / "fold.toml"
    path.write_text(text)
    with pytest.raises(ClassMapError) as e:
        load_class_map(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"class map {path}: "), msg
    assert re.search(want, msg), msg


def test_a_valid_custom_map_and_a_missing_file(tmp_path):
    path = tmp_path / "fold.toml"
    path.write_text(VALID)
    s = load_class_map(path)
    assert s.name == "mine" and s.lut[:24].tolist() == [0] * 12 + [1] * 12
    assert not s.is_binary  # a two-class map is a softmax model like any map
    with pytest.raises(ClassMapError, match="no such file"):
        load_class_map(tmp_path / "nope.toml")


# -- configuration ------------------------------------------------------------------------------
def test_data_config_reads_and_checks_the_class_fields(tmp_path):
    d = DataConfig(class_map=str(MAPS / "study-5.toml"))
    assert d.class_scheme == "map"
    assert scheme_for(d).names == load_class_map(MAPS / "study-5.toml").names
    u = DataConfig(class_scheme="unlabeled-binary", unlabeled_threshold=0,
                   pred_threshold="median")
    s = scheme_for(u)
    assert (s.threshold, s.pred_threshold, s.is_binary) == (0.0, "median", True)
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    for kwargs, want in [
        (dict(class_map=str(bad)), r"data.class_map: class map .*bad.toml: not valid TOML"),
        (dict(class_scheme="map"), r"needs data.class_map"),
        (dict(pred_threshold="median"), r"binary schemes .* not to 'six'"),
        (dict(unlabeled_threshold=0.0), r"only applies to class_scheme 'unlabeled-binary'"),
        (dict(class_scheme="unlabeled-binary", unlabeled_threshold=float("nan")),
         r"finite number"),
        (dict(class_scheme="binary", pred_threshold="max"), r"pred_threshold = 'max'"),
    ]:
        with pytest.raises(ConfigError, match=want):
            DataConfig(**kwargs)


def _train_cli():
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "launch" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_flags_set_the_class_fields():
    cli = _train_cli()
    five = str(MAPS / "study-5.toml")
    cfg = cli.config_from_args(cli.parser().parse_args(["--class-map", five]))
    assert (cfg.data.class_scheme, cfg.data.class_map) == ("map", five)
    cfg = cli.config_from_args(cli.parser().parse_args(
        ["--classes", "unlabeled-binary", "--unlabeled-threshold", "0",
         "--pred-threshold", "mean"]))
    assert (cfg.data.unlabeled_threshold, cfg.data.pred_threshold) == (0.0, "mean")
    with pytest.raises(ConfigError, match="both choose the classes"):
        cli.overrides(cli.parser().parse_args(["--classes", "six", "--class-map", five]))
    # A named scheme replaces the class map of a --config it starts from.
    base = cli.config_from_args(cli.parser().parse_args(["--class-map", five])).to_dict()
    cfg = cli.merge(base, cli.overrides(cli.parser().parse_args(["--classes", "binary"])))
    assert (cfg.data.class_scheme, cfg.data.class_map) == ("binary", None)


# -- caches serve schemes -----------------------------------------------------------------------
def test_full_cache_serves_every_scheme_and_other_caches_refuse(tmp_path):
    from segcore.data.prepare import prepare

    masks = write_layout(tmp_path / "src", "kaggle", n=4)
    prepare(tmp_path / "src", tmp_path / "full", size=256, classes="full", workers=1)
    full = discover(tmp_path / "full")
    five = load_class_map(MAPS / "study-5.toml")
    for s in full.samples:
        m = masks[s.stem]
        np.testing.assert_array_equal(full.load_mask(s, scheme("six")), scheme("six").lut[m])
        np.testing.assert_array_equal(full.load_mask(s, five), five.lut[m])
        np.testing.assert_array_equal(full.load_mask(s, scheme("unlabeled-binary")),
                                      reference_unlabeled(m, 0.5))
    prepare(tmp_path / "src", tmp_path / "ub", size=256, classes="unlabeled-binary",
            unlabeled_threshold=0.0, workers=1)
    ub = discover(tmp_path / "ub")
    s = ub.samples[0]
    np.testing.assert_array_equal(ub.load_mask(s, scheme("unlabeled-binary", threshold=0.0)),
                                  reference_unlabeled(masks[s.stem], 0.0))
    with pytest.raises(DatasetError, match="--unlabeled-threshold 0.0, not 0.5"):
        ub.load_mask(s, scheme("unlabeled-binary"))
    prepare(tmp_path / "src", tmp_path / "six", size=256, workers=1)
    with pytest.raises(DatasetError, match="--out NEW_DIR --classes full to train on study-5"):
        discover(tmp_path / "six").load_mask(s, five)


def test_dali_serves_unlabeled_binary_like_the_torch_loader(coded_dataset):
    pytest.importorskip("nvidia.dali")
    from types import SimpleNamespace

    from segcore.data.dali import make_dali_train_loader
    from segcore.data.dataset import SegDataset, make_train_loader

    idx = discover(coded_dataset)
    sch = scheme("unlabeled-binary", threshold=0.0)
    cpu = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    dl = make_dali_train_loader(idx, idx.samples, sch, (32, 32), 2, cpu, seed=3)
    tl = make_train_loader(SegDataset(idx, idx.samples, sch, (32, 32), seed=3), 2, 0, 1,
                           seed=3)
    assert dl.decoded  # per-image targets: computed by the source, not a DALI lookup
    batches = list(zip(dl, tl))
    assert len(batches) == 6
    for (_, ya), (_, yb) in batches:
        assert torch.equal(ya, yb) and set(ya.unique().tolist()) <= {0, 1}
