"""launch/prepare.py and segcore.data.prepare: the working-resolution cache."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcore.data.classes import scheme
from segcore.data.dataset import SegDataset, split_samples
from segcore.data.layouts import MANIFEST, DatasetError, discover, validate
from segcore.data.prepare import prepare, target_size

from conftest import write_broken_dataset, write_layout

REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "prepare.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def tree_state(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_target_size_keeps_aspect_and_never_upscales():
    assert target_size(6000, 4000, 1024) == (1024, 683)
    assert target_size(4000, 6000, 1024) == (683, 1024)
    assert target_size(640, 480, 1024) == (640, 480)


def test_cache_files_manifest_and_training_view(tmp_path):
    masks = write_layout(tmp_path / "src", "kaggle", n=8, ext=".jpg")
    bad = tmp_path / "src" / "dataset" / "semantic_drone_dataset" / "label_images_semantic"
    Image.fromarray(np.full((48, 64), 40, np.uint8)).save(bad / "005.png")
    with pytest.warns(UserWarning, match="unknown mask values \\[40\\]"):
        res = prepare(tmp_path / "src", tmp_path / "cache", size=32, classes="six",
                      quality=80, workers=1)
    m = res.manifest
    six = scheme("six")
    assert res.written == 7 and res.reused == 0
    assert m["source"] == str((tmp_path / "src").resolve()) and m["layout"] == "kaggle"
    assert m["scheme"] == {"name": "six", "names": list(six.names),
                           "colors": [list(c) for c in six.colors]}
    assert (m["size"], m["quality"]) == (32, 80)
    assert len(m["skipped"]) == 1 and "005.png" in m["skipped"][0]
    # The split: split_samples over the good pairs, same rule as the torch loader.
    good = [s for s in discover(tmp_path / "src").samples if s.stem != "005"]
    train, test = split_samples(good, 0.15, 0)
    assert m["split"]["train"] == [s.stem for s in train]
    assert m["split"]["test"] == [s.stem for s in test] and len(test) == 2
    counts = np.zeros(6, np.int64)
    for stem in sorted(masks):
        if stem == "005":
            assert not (tmp_path / "cache" / "images" / "005.jpg").exists()
            continue
        with Image.open(tmp_path / "cache" / "images" / f"{stem}.jpg") as im:
            assert (im.format, im.size) == ("JPEG", (32, 24))
        with Image.open(tmp_path / "cache" / "masks" / f"{stem}.png") as im:
            assert (im.format, im.mode, im.size) == ("PNG", "L", (32, 24))
            got = np.asarray(im)
        # Nearest-neighbour (never interpolated), then remapped to six classes.
        ref = np.asarray(Image.fromarray(masks[stem]).resize((32, 24), Image.NEAREST))
        np.testing.assert_array_equal(got, six.lut[ref])
        if stem in m["split"]["train"]:
            counts += np.bincount(got.ravel(), minlength=6)
    assert m["class_pixels_train"] == counts.tolist()
    assert np.isclose(sum(m["class_frequency_train"]), 1.0)

    # Training on the cache: the manifest's split, masks already in six classes.
    idx = discover(tmp_path / "cache")
    assert (idx.layout, idx.mask_kind, len(idx.samples)) == ("cache", "target", 7)
    assert [s.stem for s in idx.split(0.15, 0)[1]] == m["split"]["test"]
    with pytest.warns(UserWarning, match="prepared with test fraction 0.15, seed 0"):
        assert [s.stem for s in idx.split(0.3, 7)[1]] == m["split"]["test"]
    ds = SegDataset(idx, idx.split(0.15, 0)[0], six, (16, 16))
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and int(y.max()) < 6
    with pytest.raises(DatasetError) as e:
        idx.load_mask(idx.samples[0], scheme("binary"))
    msg = str(e.value)
    assert "\n" not in msg and "prepared for --classes six" in msg
    assert "re-run launch/prepare.py" in msg and "--classes binary" in msg


def test_prepare_skips_exactly_what_validate_reports(tmp_path):
    write_broken_dataset(tmp_path / "src")
    with pytest.warns(UserWarning, match="5 problem"):
        expected = validate(discover(tmp_path / "src"), workers=1)
    with pytest.warns(UserWarning, match="5 problem"):
        res = prepare(tmp_path / "src", tmp_path / "cache", size=32, workers=2)
    assert res.manifest["skipped"] == expected  # the same checks, the same words
    assert res.written == 3 and sorted(res.manifest["image_sizes"]) == ["000", "006", "007"]
    assert sorted(p.stem for p in (tmp_path / "cache" / "masks").iterdir()) == \
        ["000", "006", "007"]


@pytest.mark.parametrize("layout", ["tugraz", "plain_rgb", "plain"])
def test_colour_and_plain_layouts_cache_to_index_masks(tmp_path, layout):
    masks = write_layout(tmp_path / "src", layout, n=4, h=40, w=60)
    res = prepare(tmp_path / "src", tmp_path / "cache", size=128, classes="full", workers=1)
    assert res.written == 4 and res.manifest["layout"] == layout.split("_")[0]
    for stem, mask in masks.items():
        with Image.open(tmp_path / "cache" / "masks" / f"{stem}.png") as im:
            assert im.size == (60, 40)  # never upscaled
            np.testing.assert_array_equal(np.asarray(im), mask)


def test_second_run_rewrites_nothing(tmp_path):
    write_layout(tmp_path / "src", "kaggle", n=6, ext=".jpg")
    first = prepare(tmp_path / "src", tmp_path / "cache", size=32, workers=2)
    before = tree_state(tmp_path / "cache")
    assert first.written == 6 and MANIFEST in before and len(before) == 6 * 2 + 2
    second = prepare(tmp_path / "src", tmp_path / "cache", size=32, workers=1)
    assert (second.written, second.reused) == (0, 6)
    assert second.manifest == first.manifest
    assert tree_state(tmp_path / "cache") == before  # same files, same mtimes
    # Another split only rewrites the manifest.
    third = prepare(tmp_path / "src", tmp_path / "cache", size=32, workers=1, seed=5)
    after = tree_state(tmp_path / "cache")
    assert third.written == 0 and after.pop(MANIFEST) != before.pop(MANIFEST)
    assert after == before


CRASH = textwrap.dedent("""
    import os, signal, sys
    import segcore.data.prepare as P

    calls = {"n": 0}
    real_fsync = os.fsync

    def dying_fsync(fd):
        # The 5th file: leave its temporary half-written, then die like a killed process
        # (SIGKILL: no cleanup, no finally).
        calls["n"] += 1
        if calls["n"] == 5:
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(fd)

    P.os.fsync = dying_fsync
    P.prepare(sys.argv[1], sys.argv[2], size=32, workers=1)
""")


def test_killed_run_leaves_no_half_written_file_and_next_run_completes(tmp_path):
    write_layout(tmp_path / "src", "kaggle", n=6, ext=".jpg")
    out = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path / "src"), str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert not (out / MANIFEST).exists()  # written last: the cache is not usable yet
    temps = [p for p in out.rglob(".*.tmp")]
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the half-written file...
    finals = sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert 0 < len(finals) < 12
    for p in finals:  # ...never under a final name: every final file decodes completely
        with Image.open(p) as im:
            im.load()
    with pytest.raises(DatasetError, match="unfinished prepare run"):
        discover(out)
    res = prepare(tmp_path / "src", out, size=32, workers=1)
    assert res.written + res.reused == 6 and res.written >= 1
    assert not list(out.rglob(".*.tmp"))
    assert len(discover(out).samples) == 6


def test_strict_fails_after_caching_good_pairs_without_manifest(tmp_path):
    write_layout(tmp_path / "src", "kaggle", n=4)
    msk = tmp_path / "src" / "dataset" / "semantic_drone_dataset" / "label_images_semantic"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(msk / "002.png")
    with pytest.raises(DatasetError, match=r"(?s)size mismatch: .*002.*--strict"):
        prepare(tmp_path / "src", tmp_path / "cache", size=32, strict=True, workers=1)
    assert not (tmp_path / "cache" / MANIFEST).exists()
    assert len(list((tmp_path / "cache" / "masks").glob("*.png"))) == 3
    (msk / "000.png").unlink()  # unpaired: strict fails at discovery already
    with pytest.raises(DatasetError, match="image without mask"):
        prepare(tmp_path / "src", tmp_path / "cache", size=32, strict=True, workers=1)


def test_out_folder_checks(tmp_path):
    write_layout(tmp_path / "src", "kaggle", n=3)
    prepare(tmp_path / "src", tmp_path / "cache", size=32, workers=1)
    with pytest.raises(DatasetError, match="other settings: --size 32 \\(now 16\\)"):
        prepare(tmp_path / "src", tmp_path / "cache", size=16, workers=1)
    with pytest.raises(DatasetError, match="--classes six \\(now binary\\);"):
        prepare(tmp_path / "src", tmp_path / "cache", size=32, classes="binary", workers=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty and is not a segbench cache"):
        prepare(tmp_path / "src", tmp_path / "busy", workers=1)
    with pytest.raises(DatasetError, match="already a prepared cache"):
        prepare(tmp_path / "cache", tmp_path / "again", workers=1)


def test_cli_success_and_one_line_errors(tmp_path):
    write_layout(tmp_path / "src", "kaggle", n=4, ext=".jpg")
    (tmp_path / "src" / "dataset" / "semantic_drone_dataset" / "original_images" /
     "003.jpg").unlink()
    r = cli("--src", tmp_path / "src", "--out", tmp_path / "cache", "--size", 32,
            "--workers", 1, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "prepared" in r.stdout and "3 converted" in r.stdout
    assert "warning: 1 problem(s)" in r.stderr and "mask without image" in r.stderr
    (tmp_path / "afile").write_text("x")
    write_layout(tmp_path / "clean", "kaggle", n=2)
    for args, want in [
        (("--src", tmp_path / "nope", "--out", tmp_path / "o"), "--src .*nope does not exist"),
        (("--src", tmp_path / "clean", "--out", tmp_path / "afile" / "sub"),
         "cannot create --out .*afile is not a folder"),
        (("--src", tmp_path / "clean", "--out", tmp_path / "afile"), "not a folder"),
        (("--src", tmp_path / "clean", "--out", tmp_path / "o", "--quality", 0), "quality"),
        (("--src", tmp_path, "--out", tmp_path / "o"), "no recognised layout"),
    ]:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert re.search(want, lines[0]), lines[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_unfinished_settings_file_does_not_leak_into_source(tmp_path):
    # Guard: prepare never writes into --src, even when --out lies inside it.
    write_layout(tmp_path / "src", "plain", n=3)
    before = {p for p in (tmp_path / "src").rglob("*") if "cache" not in p.parts}
    prepare(tmp_path / "src", tmp_path / "src" / "cache", size=32, workers=1)
    after = {p for p in (tmp_path / "src").rglob("*") if "cache" not in p.parts}
    assert before == after
    assert discover(tmp_path / "src").layout == "plain"  # the source still reads as before
    assert json.loads((tmp_path / "src" / "cache" / MANIFEST).read_text())["layout"] == "plain"
    assert os.path.isdir(tmp_path / "src" / "cache" / "images")
