"""Surface fractions and composite runoff coefficients from class maps (segcore.predict.flood)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segcore.data.classes import SCHEMES, SDD_NAMES, SIX_NAMES, scheme
from segcore.predict.flood import (
    SURFACES,
    PropertyError,
    aggregate,
    default_properties,
    load_properties,
    peak_flow,
    surface_stats,
)


def exact_map(counts: dict[int, int], shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A (H, W) uint8 map with exactly ``counts[value]`` pixels of each value, shuffled."""
    flat = np.concatenate([np.full(n, v, np.uint8) for v, n in counts.items()])
    assert flat.size == shape[0] * shape[1]
    np.random.default_rng(seed).shuffle(flat)
    return flat.reshape(shape)


# six: unlabeled 0, paved-area 1, dirt 2, grass 3, roof 4, water 5; 255 ignored
SIX_COUNTS = {0: 10, 1: 30, 2: 0, 3: 40, 4: 15, 5: 5, 255: 10}  # 110 pixels


def test_fractions_and_c_match_hand_computation():
    m = exact_map(SIX_COUNTS, (10, 11))
    s = surface_stats(m, SIX_NAMES, load_properties(None, "six"))
    assert s["pixels_total"] == 110
    assert s["pixels_ignored"] == 10
    assert s["pixels_unknown"] == 20  # 10 unlabeled + 10 ignored
    assert s["pixels_known"] == 90
    assert s["class_pixels"] == {"unlabeled": 10, "paved-area": 30, "dirt": 0, "grass": 40,
                                 "roof": 15, "water": 5}
    assert s["class_fractions"]["grass"] == pytest.approx(40 / 110, abs=1e-15)
    assert s["class_fractions"]["dirt"] == 0.0
    assert s["unknown_fraction"] == pytest.approx(20 / 110, abs=1e-15)
    # surface fractions are over the 90 classified pixels
    assert s["impervious_fraction"] == pytest.approx((30 + 15) / 90, abs=1e-15)
    assert s["pervious_fraction"] == pytest.approx(40 / 90, abs=1e-15)
    assert s["water_fraction"] == pytest.approx(5 / 90, abs=1e-15)
    # defaults: paved .70/.85/.95, grass .05/.20/.35, roof .75/.85/.95, water 1
    assert s["C_low"] == pytest.approx((30 * .70 + 40 * .05 + 15 * .75 + 5 * 1) / 90, abs=1e-12)
    assert s["C_typical"] == pytest.approx((30 * .85 + 40 * .20 + 15 * .85 + 5 * 1) / 90,
                                           abs=1e-12)
    assert s["C_high"] == pytest.approx((30 * .95 + 40 * .35 + 15 * .95 + 5 * 1) / 90,
                                        abs=1e-12)


def test_unknown_pixels_reported_but_excluded_from_c():
    # Only unknown pixels change between the two maps: C and surface fractions stay put.
    base = {1: 30, 3: 40, 4: 15, 5: 5}
    a = surface_stats(exact_map(base, (9, 10)), SIX_NAMES, default_properties("six"))
    b = surface_stats(exact_map({**base, 0: 50, 255: 20}, (10, 16)), SIX_NAMES,
                      default_properties("six"))
    assert a["unknown_fraction"] == 0.0
    assert b["unknown_fraction"] == pytest.approx(70 / 160)
    for k in ("C_low", "C_typical", "C_high", "impervious_fraction", "pervious_fraction",
              "water_fraction"):
        assert b[k] == pytest.approx(a[k], abs=1e-15), k
    # A map with no classified pixel has no C: NaN, not 0.
    c = surface_stats(np.zeros((4, 4), np.uint8), SIX_NAMES, default_properties("six"))
    assert c["unknown_fraction"] == 1.0 and math.isnan(c["C_typical"])
    assert math.isnan(c["impervious_fraction"])


def test_full_scheme_with_custom_table(tmp_path):
    # Simple coefficients so the expected C is plain arithmetic.
    p = tmp_path / "props.toml"
    p.write_text('[classes.grass]\nc = [0.1, 0.2, 0.3]\n'
                 '[classes.roof]\nc = [0.8, 0.9, 1.0]\n'
                 '[classes.person]\nsurface = "impervious"\nc = [0.5, 0.5, 0.5]\n')
    t = load_properties(p, "full")
    idx = {n: i for i, n in enumerate(SDD_NAMES)}
    m = exact_map({idx["grass"]: 50, idx["roof"]: 25, idx["person"]: 25, idx["fence"]: 20},
                  (8, 15))
    s = surface_stats(torch.from_numpy(m), SDD_NAMES, t)  # torch input works too
    assert s["unknown_fraction"] == pytest.approx(20 / 120)
    assert s["impervious_fraction"] == pytest.approx(50 / 100)
    assert s["C_low"] == pytest.approx((50 * .1 + 25 * .8 + 25 * .5) / 100)
    assert s["C_typical"] == pytest.approx((50 * .2 + 25 * .9 + 25 * .5) / 100)
    assert s["C_high"] == pytest.approx((50 * .3 + 25 * 1.0 + 25 * .5) / 100)


def test_torch_and_numpy_inputs_agree():
    m = exact_map(SIX_COUNTS, (10, 11), seed=3)
    t = default_properties("six")
    a = surface_stats(m, SIX_NAMES, t)
    b = surface_stats(torch.from_numpy(m.astype(np.int64)), SIX_NAMES, t)
    assert a == b


def test_ignore_index_none_and_negative():
    t = default_properties("six")
    m = exact_map({1: 4, 3: 4}, (2, 4)).astype(np.int64)
    m[0, 0] = -100
    s = surface_stats(m, SIX_NAMES, t, ignore_index=-100)
    assert s["pixels_ignored"] == 1 and s["pixels_total"] == 8
    with pytest.raises(ValueError, match="index -100"):
        surface_stats(m, SIX_NAMES, t, ignore_index=None)


def test_bad_maps_raise():
    t = default_properties("six")
    with pytest.raises(ValueError, match="index 7"):
        surface_stats(np.array([[0, 7]], np.uint8), SIX_NAMES, t)
    with pytest.raises(ValueError, match="integer"):
        surface_stats(np.zeros((2, 2), np.float32), SIX_NAMES, t)
    with pytest.raises(ValueError, match="no entry"):
        surface_stats(np.zeros((2, 2), np.uint8), ("unlabeled", "lava"),
                      default_properties("six"))


def test_aggregate_equals_stats_of_concatenated_maps():
    t = default_properties("six")
    rng = np.random.default_rng(1)
    maps = []
    for h in (3, 17, 40):  # very different sizes: a mean of ratios would be wrong
        m = rng.integers(0, 6, size=(h, 23)).astype(np.uint8)
        m[rng.random(m.shape) < 0.1] = 255
        maps.append(m)
    maps[0][:] = 5  # a small all-water image
    per_image = [surface_stats(m, SIX_NAMES, t) for m in maps]
    agg = aggregate(per_image)
    whole = surface_stats(np.concatenate(maps, axis=0), SIX_NAMES, t)
    assert agg["images"] == 3
    del agg["images"]
    assert agg.keys() == whole.keys()
    for k, v in whole.items():
        if isinstance(v, float):
            assert agg[k] == pytest.approx(v, abs=1e-12), k
        else:
            assert agg[k] == v, k
    mean_of_ratios = np.mean([s["water_fraction"] for s in per_image])
    assert abs(mean_of_ratios - agg["water_fraction"]) > 0.1


def test_aggregate_rejects_empty_and_mixed():
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])
    m = np.zeros((2, 2), np.uint8)
    a = surface_stats(m, SIX_NAMES, default_properties("six"))
    b = surface_stats(m, ("rest", "paved-area"), default_properties("binary"))
    with pytest.raises(ValueError, match="different"):
        aggregate([a, b])


def test_toml_override(tmp_path):
    p = tmp_path / "props.toml"
    p.write_text('scheme = "six"\n'
                 '[classes.grass]\nsurface = "pervious"\nc = [0.10, 0.20, 0.35]\n'
                 '[classes.water]\nsurface = "unknown"\n'
                 '[classes.unlabeled]\nsurface = "pervious"\nc = [0, 0.5, 1]\n'
                 '[classes.roof]\nc = [0.9, 0.95, 1.0]\n')
    t = load_properties(p, "six")
    assert t.source == str(p)
    assert t["grass"].c == (0.10, 0.20, 0.35)
    assert t["water"].surface == "unknown" and t["water"].c is None
    assert t["unlabeled"].c == (0.0, 0.5, 1.0)
    assert t["roof"].surface == "impervious" and t["roof"].c == (0.9, 0.95, 1.0)
    assert t["paved-area"] == default_properties("six")["paved-area"]  # untouched
    # defaults are not modified by an override
    assert default_properties("six")["water"].c == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("text, match", [
    ('[classes.lava]\nsurface = "impervious"\nc = [0.1, 0.2, 0.3]\n',
     r"\[classes\.lava\].*unknown class 'lava'.*paved-area"),
    ('[classes.grass]\nsurface = "asphalt"\n',
     r"\[classes\.grass\].*surface = 'asphalt'.*pervious, impervious, water, unknown"),
    ('[classes.grass]\nc = [0.1, 0.2]\n', r"\[classes\.grass\].*3 numbers"),
    ('[classes.grass]\nc = ["low", 0.2, 0.3]\n', r"\[classes\.grass\].*3 numbers"),
    ('[classes.grass]\nc = [true, 0.2, 0.3]\n', r"\[classes\.grass\].*3 numbers"),
    ('[classes.grass]\nc = 0.2\n', r"\[classes\.grass\].*3 numbers"),
    ('[classes.grass]\nc = [0.1, 0.2, 1.5]\n', r"\[classes\.grass\].*outside \[0, 1\]"),
    ('[classes.grass]\nc = [-0.1, 0.2, 0.3]\n', r"\[classes\.grass\].*outside \[0, 1\]"),
    ('[classes.grass]\nc = [0.3, 0.2, 0.4]\n', r"\[classes\.grass\].*not ordered.*low <= typical"),
    ('[classes.grass]\nsurface = "unknown"\nc = [0.1, 0.2, 0.3]\n',
     r"\[classes\.grass\].*takes no c"),
    ('[classes.unlabeled]\nsurface = "pervious"\n', r"\[classes\.unlabeled\].*needs c"),
    ('[classes.grass]\ncoef = [0.1, 0.2, 0.3]\n', r"\[classes\.grass\].*unknown key.*'c'"),
    ('[classes]\ngrass = 0.2\n', r"\[classes\.grass\].*must be a table"),
    ('[surfaces.grass]\nc = [0.1, 0.2, 0.3]\n', r"unknown top-level key.*'classes'"),
    ('scheme = "full"\n', r"scheme = 'full'.*'six'"),
    ('[classes.grass\nc = 1\n', r"not valid TOML"),
])
def test_toml_validation_errors(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(PropertyError, match=match) as e:
        load_properties(p, "six")
    assert str(p) in str(e.value)  # every message names the file


def test_missing_file_and_unknown_scheme(tmp_path):
    with pytest.raises(PropertyError, match="does not exist"):
        load_properties(tmp_path / "nope.toml", "six")
    with pytest.raises(PropertyError, match="binary, six, full"):
        load_properties(None, "eight")


@pytest.mark.parametrize("name", SCHEMES)
def test_every_scheme_has_complete_defaults(name):
    t = default_properties(name)
    names = scheme(name).names
    assert t.names == names
    assert set(t.props) == set(names)
    for n in names:
        p = t[n]
        assert p.surface in SURFACES, n
        if p.surface == "unknown":
            assert p.c is None, n
        else:
            lo, typ, hi = p.c
            assert 0 <= lo <= typ <= hi <= 1, n
    if name != "binary":
        assert t["unlabeled"].surface == "unknown"
        assert t["water"].c == (1.0, 1.0, 1.0)
    assert t["paved-area"].surface == "impervious"
    assert t["paved-area"].c == (0.70, 0.85, 0.95)


def test_six_defaults_bracket_their_folded_full_classes():
    # Each six-class range must contain the ranges of the full classes folded into it
    # (unknown stays unknown), so the two schemes tell the same story.
    from segcore.data.classes import SIX_CLASS_MAP
    full, six = default_properties("full"), default_properties("six")
    for src, dst in SIX_CLASS_MAP.items():
        if full[src].surface == "unknown" or six[dst].surface == "unknown":
            assert full[src].surface == six[dst].surface == "unknown", src
            continue
        assert full[src].surface == six[dst].surface, src
        assert six[dst].c[0] <= full[src].c[0] and full[src].c[2] <= six[dst].c[2], src


def test_peak_flow_units():
    # C = 0.5, 36 mm/h on one hectare: 0.5 * 1e-5 m/s * 1e4 m^2 = 0.05 m^3/s
    assert peak_flow(0.5, 36.0, 10_000.0) == pytest.approx(0.05)
