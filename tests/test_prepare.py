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
from segcore.data.dataset import SegDataset
from segcore.data.layouts import split_samples
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


# -- offline augmentation --------------------------------------------------------------------
def write_pattern_source(root: Path, n: int = 6, h: int = 96, w: int = 144) -> dict:
    """Lossless pairs whose gray level is 10 x the label, in 12-px blocks (so a resize
    blends few pixels), Kaggle layout. Returns the label mask per stem."""
    from segcore.data.classes import write_class_csv

    rng = np.random.default_rng(5)
    base = root / "dataset" / "semantic_drone_dataset"
    (base / "original_images").mkdir(parents=True)
    (base / "label_images_semantic").mkdir(parents=True)
    masks = {}
    for i in range(n):
        blocks = rng.integers(0, 24, size=(h // 12, w // 12), dtype=np.uint8)
        mask = np.kron(blocks, np.ones((12, 12), np.uint8))
        # Gray: JPEG keeps luma at full resolution (its colour is subsampled 2x).
        image = np.repeat(mask[..., None] * 10, 3, axis=2)
        Image.fromarray(image).save(base / "original_images" / f"{i:03d}.png")
        Image.fromarray(mask).save(base / "label_images_semantic" / f"{i:03d}.png")
        masks[f"{i:03d}"] = mask
    write_class_csv(root / "class_dict_seg.csv")
    return masks


def read_pair(out: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    with Image.open(out / "images" / f"{stem}.jpg") as a, \
            Image.open(out / "masks" / f"{stem}.png") as b:
        return np.asarray(a.convert("RGB")).astype(int), np.asarray(b)


def agreement(image: np.ndarray, mask: np.ndarray, k: int = 9) -> float:
    """Share of pixels whose image still encodes their mask label (gray = 10 x label),
    over the pixels whose k x k neighbourhood holds one label (a Lanczos resize blends
    and rings near the edges)."""
    from numpy.lib.stride_tricks import sliding_window_view

    win = sliding_window_view(np.pad(mask, k // 2, mode="edge"), (k, k))
    flat = win.min(axis=(2, 3)) == win.max(axis=(2, 3))
    return float((np.rint(image.mean(axis=2) / 10) == mask)[flat].mean())


def test_offline_augment_makes_the_four_paired_variants(tmp_path):
    masks = write_pattern_source(tmp_path / "src")
    out = tmp_path / "aug"
    res = prepare(tmp_path / "src", out, size=144, classes="full", quality=100, workers=1,
                  offline_augment=4)
    m = res.manifest
    plain = prepare(tmp_path / "src", tmp_path / "plain", size=144, classes="full",
                    workers=1).manifest
    # The split is drawn over the photos: the same test photos as without augmentation,
    # each cached once, unaugmented; every training photo has its four variants.
    assert m["split"]["test"] == plain["split"]["test"] and len(m["split"]["test"]) == 1
    train = plain["split"]["train"]
    assert m["split"]["train"] == sorted(f"{s}{v}" for s in train
                                         for v in ("", "+crop", "+hflip", "+vflip"))
    for s in m["split"]["test"]:
        assert sorted(p.name for p in (out / "images").glob(f"{s}*")) == [f"{s}.jpg"]
    assert res.written == 4 * len(train) + 1
    assert m["offline_augment"]["variants"] == ["resize", "crop", "hflip", "vflip"]
    counts = sum(np.bincount(read_pair(out, s)[1].ravel(), minlength=24)
                 for s in m["split"]["train"])
    assert m["class_pixels_train"] == counts.tolist()

    for s in train:
        image, mask = read_pair(out, s)
        np.testing.assert_array_equal(mask, masks[s])  # no resize: the labels themselves
        h_img, h_mask = read_pair(out, f"{s}+hflip")
        v_img, v_mask = read_pair(out, f"{s}+vflip")
        np.testing.assert_array_equal(h_mask, mask[:, ::-1])
        np.testing.assert_array_equal(v_mask, mask[::-1])
        assert np.abs(h_img - image[:, ::-1]).mean() < 2  # the image flipped the same way
        assert np.abs(v_img - image[::-1]).mean() < 2
        c_img, c_mask = read_pair(out, f"{s}+crop")
        left, top, right, bottom = m["offline_augment"]["crop_boxes"][f"{s}+crop"]
        assert (right - left, bottom - top) == (96, 64)  # 2/3 of each side
        # Nearest-neighbour from the window, computed here independently (pixel centres
        # that fall exactly on a source pixel's edge may round either way: left out).
        fy, fx = (np.arange(96) + 0.5) * 64 / 96, (np.arange(144) + 0.5) * 96 / 144
        ys, xs = top + fy.astype(int), left + fx.astype(int)
        clear = np.ix_(fy % 1 != 0, fx % 1 != 0)
        np.testing.assert_array_equal(c_mask[clear], masks[s][np.ix_(ys, xs)][clear])
        for img, msk in ((image, mask), (h_img, h_mask), (v_img, v_mask)):
            assert agreement(img, msk) > 0.99
        assert agreement(c_img, c_mask) > 0.95
        # The check can fail: a mask that missed the image's flip or crop disagrees.
        assert agreement(h_img, mask) < 0.5 and agreement(c_img, mask) < 0.5


def test_offline_augment_is_deterministic_per_seed_and_resumable(tmp_path):
    write_pattern_source(tmp_path / "src", n=5)
    a = prepare(tmp_path / "src", tmp_path / "a", size=72, workers=2, offline_augment=4)
    b = prepare(tmp_path / "src", tmp_path / "b", size=72, workers=1, offline_augment=4)
    c = prepare(tmp_path / "src", tmp_path / "c", size=72, workers=1, offline_augment=4,
                augment_seed=1)
    boxes = a.manifest["offline_augment"]["crop_boxes"]
    assert boxes == b.manifest["offline_augment"]["crop_boxes"]
    assert boxes != c.manifest["offline_augment"]["crop_boxes"]
    for stem in boxes:
        assert (tmp_path / "a" / "masks" / f"{stem}.png").read_bytes() == \
            (tmp_path / "b" / "masks" / f"{stem}.png").read_bytes()
    # Fewer variants: the first n of the study's order.
    two = prepare(tmp_path / "src", tmp_path / "two", size=72, workers=1, offline_augment=2)
    assert {s.split("+")[-1] for s in two.manifest["split"]["train"] if "+" in s} == {"crop"}
    # A finished cache is reused as it is; other augmentation settings are refused.
    again = prepare(tmp_path / "src", tmp_path / "a", size=72, workers=1, offline_augment=4)
    assert (again.written, again.reused) == (0, a.written)
    assert again.manifest == a.manifest
    with pytest.raises(DatasetError, match="--offline-augment 4 \\(now 1\\)"):
        prepare(tmp_path / "src", tmp_path / "a", size=72, workers=1)
    with pytest.raises(DatasetError, match="--augment-seed 0 \\(now 3\\)"):
        prepare(tmp_path / "src", tmp_path / "a", size=72, workers=1, offline_augment=4,
                augment_seed=3)
    idx = discover(tmp_path / "a")
    train, test = idx.split(0.15, 0)
    assert len(train) == len(a.manifest["split"]["train"]) and len(test) == 1


# -- every problem at once, and no traceback -------------------------------------------------------
def write_five_faults(root: Path) -> Path:
    """One folder with all five faults of the drill: image without mask, mask without
    image, corrupt JPEG, unknown mask value, size mismatch."""
    write_layout(root, "kaggle", n=8, ext=".jpg")
    base = root / "dataset" / "semantic_drone_dataset"
    img, msk = base / "original_images", base / "label_images_semantic"
    (msk / "006.png").unlink()
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(msk / "099.png")
    (img / "001.jpg").write_bytes(b"not a jpeg at all")
    with Image.open(msk / "005.png") as im:
        bad = np.asarray(im).copy()
    bad[3, 4] = 99
    Image.fromarray(bad).save(msk / "005.png")
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(msk / "004.png")
    return root


FIVE = [r"image without mask: .*006\.jpg", r"mask without image: .*099\.png",
        r"corrupt image: .*001\.jpg", r"unknown mask values \[99\] in .*005\.png",
        r"size mismatch: image .*004\.jpg is 64x48 but mask .*004\.png is 32x24"]


def test_strict_names_all_five_faults_at_once(tmp_path):
    src = write_five_faults(tmp_path / "src")
    with pytest.raises(DatasetError) as e:
        prepare(src, tmp_path / "cache", size=32, strict=True, workers=1)
    msg = str(e.value)
    assert msg.startswith(f"5 problem(s) in {src}:")
    for want in FIVE:
        assert re.search(want, msg), (want, msg)
    assert not (tmp_path / "cache" / MANIFEST).exists()
    assert sorted(p.stem for p in (tmp_path / "cache" / "masks").iterdir()) == \
        ["000", "002", "003", "007"]  # the good pairs are cached
    # Without --strict: the same five in one warning, and the manifest records them.
    with pytest.warns(UserWarning, match="5 problem") as rec:
        res = prepare(src, tmp_path / "cache", size=32, workers=2)
    assert len(rec) == 1
    assert len(res.manifest["skipped"]) == 5 and res.reused == 4
    r = cli("--src", src, "--out", tmp_path / "c2", "--strict", "--workers", 2, "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: 5 problem(s) in ")
    for want in FIVE:
        assert re.search(want, r.stderr), (want, r.stderr)


def test_cli_bad_flags_give_one_error_line(tmp_path):
    write_layout(tmp_path / "src", "kaggle", n=3)
    for args, want in [
        (("--size", "abc"), r"argument --size: invalid int value: 'abc'"),
        (("--classes", "eight"), r"argument --classes: invalid choice: 'eight'"),
        (("--offline-augment", 7), r"offline_augment = 7 must be 1 .* to 4"),
        (("--unlabeled-threshold", 0), r"--unlabeled-threshold applies to --classes "
                                       r"unlabeled-binary, not six"),
        (("--classes", "unlabeled-binary", "--unlabeled-threshold", "nan"), r"finite"),
    ]:
        r = cli("--src", tmp_path / "src", "--out", tmp_path / "o", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (args, r.stderr)
        assert lines[0].startswith("error: ") and re.search(want, lines[0]), lines[0]
    r = cli("--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: the following arguments are required: --src (see --help)"]


# -- kill -9 leaves no process behind --------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) from /proc, or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(root: int) -> set[tuple[int, int]]:
    """(pid, start time) of every process below ``root``: the start time tells a pid
    reused later from the process we saw."""
    children: dict[int, list[tuple[int, int]]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := _proc_stat(int(d))) is not None:
            children.setdefault(st[1], []).append((int(d), st[2]))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child[0])
    return found


def _running(procs: set[tuple[int, int]]) -> list[int]:
    alive = []
    for pid, start in procs:
        st = _proc_stat(pid)
        if st is not None and st[2] == start and st[0] not in "ZX":  # zombies are dead
            alive.append(pid)
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_prepare_with_workers_leaves_no_process(tmp_path):
    import signal
    import time

    # Enough full decodes (lossless 600x900 PNGs) that the pool is mid-way when killed.
    src = tmp_path / "src"
    write_layout(src, "kaggle", n=1, h=600, w=900)
    base = src / "dataset" / "semantic_drone_dataset"
    for sub, ext in (("original_images", ".png"), ("label_images_semantic", ".png")):
        data = (base / sub / f"000{ext}").read_bytes()
        for i in range(1, 120):
            (base / sub / f"{i:03d}{ext}").write_bytes(data)
    out = tmp_path / "cache"
    p = subprocess.Popen([sys.executable, str(REPO / "launch" / "prepare.py"), "--src", src,
                          "--out", out, "--size", "300", "--workers", "2", "--quiet"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: set[tuple[int, int]] = set()
    try:
        deadline = time.monotonic() + 90
        # Mid-way: the pool's workers have written a file, and the run is not finished.
        while time.monotonic() < deadline and p.poll() is None:
            seen |= _descendants(p.pid)
            if len(seen) >= 3 and any((out / "masks").glob("*.png")):
                break
            time.sleep(0.02)
        assert p.poll() is None, "prepare finished before it could be killed; give it more work"
        assert len(seen) >= 3, seen  # 2 pool workers + the resource tracker
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 10
        while _running(seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _running(seen)
        assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:100] for pid in left]
        assert not (out / MANIFEST).exists()
    finally:
        for pid in _running(seen):  # never leak into the next test
            os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
