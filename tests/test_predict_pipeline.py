"""The overlapped prediction pipeline (segcore.predict.pipeline) against the sequential path.

Every test runs on tiny photos (64 x 96 px) through a real (random) U-Net or a position-
dependent function. The pipelined run (reader thread, writer pool) must write the same
bytes as the sequential one (``prefetch=0, writers=0``), and the GPU-decode path, with a
PIL decoder injected in place of nvJPEG, the same as the CPU decode.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from segcore.config import ConfigError
from segcore.data.classes import scheme as make_scheme
from segcore.data.images import read_image
from segcore.model.unet import build_model
from segcore.config import ModelConfig
from segcore.predict import folder as folder_mod
from segcore.predict.blocks import predict_class_map, predict_classes
from segcore.predict.flood import load_properties, surface_stats
from segcore.predict.folder import Hooks, PredictSettings, predict_folder
from segcore.predict.pipeline import (Prefetcher, StageTimes, class_counts,
                                      stats_from_counts)
from test_predict import one_error_line, random_checkpoint, run_cli, save_png

SIX = make_scheme("six")


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(widths=(8, 16)), SIX.num_classes).eval()


def photos(folder: Path, n: int = 3, corrupt_at: int | None = 1) -> list[Path]:
    """n photos (PNG and JPEG alternating), a truncated JPEG at ``corrupt_at``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        arr = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
        p = folder / (f"p{i}.jpg" if i % 2 == 0 else f"p{i}.png")
        Image.fromarray(arr).save(p, quality=90)
        out.append(p)
    if corrupt_at is not None:
        bad = folder / f"p{corrupt_at}_cut.jpg"
        data = out[0].read_bytes()
        bad.write_bytes(data[:len(data) // 2])
        out.insert(corrupt_at, bad)
    return out


def pil_decoder(calls: list):
    def decode(tensors, device):
        calls.append(len(tensors))
        out = []
        for t in tensors:
            with Image.open(io.BytesIO(t.numpy().tobytes())) as im:
                im.load()
                out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
        return out
    return decode


def run(tmp: Path, imgs: list[Path], name: str, truth=None, decoder=None, **kw):
    settings = PredictSettings(tile=32, overlap=0.25, batch_size=3, **kw)
    logs: list[str] = []
    res = predict_folder(tiny_unet(), SIX, imgs, tmp / name, num_out_channels=6,
                         settings=settings, truth=truth, hooks=Hooks(log=logs.append),
                         decoder=decoder)
    return res, logs


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.suffix in (".png", ".jpg") and p.name != "summary.png"}


def table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "surface_stats.csv").drop(columns="seconds")


def test_pipelined_run_writes_what_the_sequential_run_writes(tmp_path):
    imgs = photos(tmp_path / "imgs", n=4, corrupt_at=2)
    mask = np.random.default_rng(9).integers(0, 6, (64, 96), dtype=np.uint8)
    truth = {"p1": save_png(tmp_path / "truth" / "p1.png", mask)}
    seq, seq_log = run(tmp_path, imgs, "seq", truth, prefetch=0, writers=0)
    pip, pip_log = run(tmp_path, imgs, "pip", truth, prefetch=2, writers=3)
    assert outputs(tmp_path / "seq") == outputs(tmp_path / "pip")
    assert len(outputs(tmp_path / "seq")) == 4 * 3  # classes, colour, overlay
    pd.testing.assert_frame_equal(table(tmp_path / "seq"), table(tmp_path / "pip"))
    assert seq_log == pip_log and len(seq_log) == 4  # one skip, three without truth
    assert seq.skipped == pip.skipped and [s["image"] for s in seq.skipped] == ["p2_cut.jpg"]
    assert pip.timing.images == 4 and pip.timing.skipped == 1
    assert pip.timing.pixels == 4 * 64 * 96
    # The device counts give flood's own statistics of the map the old path makes.
    row = pip.rows[1]
    classes = predict_classes(tiny_unet(), read_image(imgs[1]), 6, tile=32, overlap=0.25,
                              batch_size=3)
    stats = surface_stats(classes, SIX.names, load_properties(None, "six"),
                          ignore_index=None)
    assert row["C_typical"] == stats["C_typical"]
    assert [row[f"frac.{n}"] for n in SIX.names] == list(stats["class_fractions"].values())
    written = np.asarray(Image.open(tmp_path / "pip" / "p1_classes.png"))
    np.testing.assert_array_equal(written, classes)
    assert row["pixel_accuracy"] == np.mean(classes == mask)


def test_gpu_decode_path_equals_cpu_decode(tmp_path):
    """--decode gpu with PIL injected for nvJPEG: same files and rows as --decode cpu;
    the corrupt JPEG is skipped with the CPU path's message."""
    imgs = photos(tmp_path / "imgs", n=3, corrupt_at=1)
    cpu, cpu_log = run(tmp_path, imgs, "cpu")
    calls: list[int] = []
    gpu, gpu_log = run(tmp_path, imgs, "gpu", decode="gpu", decoder=pil_decoder(calls))
    assert outputs(tmp_path / "cpu") == outputs(tmp_path / "gpu")
    pd.testing.assert_frame_equal(table(tmp_path / "cpu"), table(tmp_path / "gpu"))
    assert cpu_log == gpu_log and "p1_cut.jpg" in gpu_log[0]
    # start-up check, p0.jpg, p1_cut.jpg (batch fails, then alone), p2.jpg; p1.png: PIL
    assert calls == [1, 1, 1, 1, 1]
    assert gpu.timing.cpu_fallbacks == 1 and cpu.timing.cpu_fallbacks == 0


def test_device_map_and_counts_equal_the_host_path():
    img = np.random.default_rng(3).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    model = tiny_unet(1)
    host = predict_classes(model, img, 6, tile=32, overlap=0.25, max_block_mb=0.02)
    dev = predict_class_map(model, torch.from_numpy(img).permute(2, 0, 1), 6, tile=32,
                            overlap=0.25, max_block_mb=0.02)
    np.testing.assert_array_equal(dev.numpy(), host)
    counts = class_counts(dev, 6).numpy()
    np.testing.assert_array_equal(counts, np.bincount(host.ravel(), minlength=6))
    table_ = load_properties(None, "six")
    assert stats_from_counts(counts, SIX, table_) == surface_stats(host, SIX.names, table_,
                                                                   ignore_index=None)
    with pytest.raises(ValueError, match=r"\(5,\) counts for the 6 classes"):
        stats_from_counts(counts[:5], SIX, table_)
    with pytest.raises(ValueError, match="pixels must be RGB uint8"):
        predict_class_map(model, torch.zeros(70, 90, 3, dtype=torch.uint8), 6)


def test_figures_choose_the_files(tmp_path):
    imgs = photos(tmp_path / "imgs", n=1, corrupt_at=None)
    for figures, files in (("none", ["p0_classes.png"]),
                           ("color", ["p0_classes.png", "p0_color.png"]),
                           ("overlay", ["p0_classes.png", "p0_overlay.jpg"])):
        res, _ = run(tmp_path, imgs, figures, figures=figures)
        assert sorted(outputs(tmp_path / figures)) == files
        assert sorted(p.name for p in res.files if p.parent.name == figures
                      and p.suffix in (".png", ".jpg") and p.name != "summary.png") == files


def test_reader_thread_error_surfaces_after_earlier_photos_are_written(tmp_path):
    imgs = photos(tmp_path / "imgs", n=3, corrupt_at=None)
    calls: list[int] = []
    decode = pil_decoder(calls)

    def flaky(tensors, device):
        if len(calls) == 2:  # start-up check and p0.jpg pass; p2.jpg fails
            raise KeyError("decoder state lost")
        return decode(tensors, device)

    with pytest.raises(KeyError, match="decoder state lost"):
        run(tmp_path, imgs, "out", decode="gpu", decoder=flaky, prefetch=1, writers=2)
    rows = pd.read_csv(tmp_path / "out" / "surface_stats.csv")["image"].tolist()
    assert rows == ["p0.jpg", "p1.png", "ALL"]
    assert (tmp_path / "out" / "p1_overlay.jpg").is_file()


def test_writer_error_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    photos(tmp_path / "imgs", n=2, corrupt_at=None)
    real = folder_mod._save_color

    def full_disk(path, classes, sch):
        if path.name == "p1_color.png":
            raise OSError(28, "No space left on device")
        real(path, classes, sch)

    monkeypatch.setattr(folder_mod, "_save_color", full_disk)
    ckpt = random_checkpoint(tmp_path / "r.pt", "six")
    rc, _, err = run_cli(capsys, "--checkpoint", ckpt, "--images", tmp_path / "imgs",
                         "--out", tmp_path / "out", "--tile", 32, "--writers", 2)
    assert rc == 2
    line = one_error_line(err)
    assert "cannot write" in line and "p1_color.png" in line and "No space left" in line
    assert (tmp_path / "out" / "p0_color.png").is_file()  # the photo before it finished


def test_cli_timing_json_and_speed_line(tmp_path, capsys):
    photos(tmp_path / "imgs", n=2, corrupt_at=1)
    ckpt = random_checkpoint(tmp_path / "r.pt", "six")
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "--checkpoint", ckpt, "--images", tmp_path / "imgs",
                              "--out", out, "--tile", 32, "--figures", "none")
    assert rc == 0, err
    timing = json.loads((out / "timing.json").read_text())
    assert timing["images"] == 2 and timing["images_skipped"] == 1
    assert timing["megapixels"] == 2 * 64 * 96 / 1e6
    assert set(timing["busy_s"]) == {"decode", "infer", "stats", "write"}
    assert timing["mpx_per_s"] == pytest.approx(timing["megapixels"] / timing["wall_s"],
                                                rel=2e-3)
    assert timing["figures"] == "none" and timing["decode"] == "cpu"
    assert timing["total_s"] >= timing["wall_s"] > 0
    speed = [ln for ln in stdout.splitlines() if ln.startswith("speed: ")]
    assert len(speed) == 1 and " Mpx/s end to end over 2 image(s) (decode " in speed[0]
    assert speed[0].endswith(" s)") and "busy; wall " in speed[0]
    assert sorted(p.name for p in out.glob("*_*.png")) == ["p0_classes.png", "p1_classes.png"]


def test_decode_gpu_without_cuda_is_one_line_before_the_checkpoint(tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    photos(tmp_path / "imgs", n=1, corrupt_at=None)
    rc, _, err = run_cli(capsys, "--checkpoint", tmp_path / "missing.pt", "--images",
                         tmp_path / "imgs", "--out", tmp_path / "out", "--decode", "gpu")
    assert rc == 2
    assert one_error_line(err).startswith("error: --decode gpu needs a CUDA device")


@pytest.mark.parametrize("field, value, match", [
    ("prefetch", -1, "predict.prefetch = -1 must be an integer >= 0"),
    ("writers", 1.5, "predict.writers = 1.5 must be an integer >= 0"),
    ("figures", "some", "predict.figures = 'some' is not valid; choose one of: all, color"),
    ("decode", "nvjpeg", "predict.decode = 'nvjpeg' is not valid; choose one of: cpu, gpu"),
])
def test_settings_are_checked(field, value, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(".", r"\.")):
        PredictSettings(**{field: value})


def test_prefetcher_stays_bounded_and_closes():
    reads: list[int] = []

    def read(i, path):
        reads.append(i)
        return i

    pf = Prefetcher([Path(f"{i}") for i in range(10)], read, prefetch=1)
    it = iter(pf)
    assert next(it) == 0
    time.sleep(0.3)  # let the reader run as far as the queue lets it
    assert max(reads) <= 2  # one in the queue, one waiting to be put
    thread = pf._thread
    pf.close()  # the reader is blocked on a full queue: close must still end it
    assert not thread.is_alive()
    assert list(Prefetcher([Path("a"), Path("b")], read, prefetch=0)) == [0, 1]


def test_stage_times_line_and_dict():
    t = StageTimes("cuda:0")
    t.add("infer", 2.0)
    t.add("write", 0.5)
    t.images, t.pixels, t.wall = 3, 6_000_000, 2.5
    assert t.line() == ("speed: 2.4 Mpx/s end to end over 3 image(s) (decode 0.0 s, infer "
                        "2.0 s, stats 0.0 s, write 0.5 s busy; wall 2.5 s)")
    d = t.to_dict(decode="gpu")
    assert d["mpx_per_s"] == 2.4 and d["megapixels"] == 6.0 and d["decode"] == "gpu"
    assert d["device"] == "cuda:0"
    empty = StageTimes()
    assert empty.to_dict()["mpx_per_s"] is None and "n/a Mpx/s" in empty.line()
