#!/usr/bin/env python
"""First-GPU acceptance run: every CUDA path of segbench, once, in one prepared script.

    python bench/gpu_check.py                        # on the GPU machine (< 8 min, H100/H200)
    python bench/gpu_check.py --wheels /wheels       # install missing packages from wheels
    python bench/gpu_check.py --device cpu --out /tmp/gc   # the same steps on a CPU (CI)
    python bench/gpu_check.py --only env,timing      # a subset; --list shows the steps

Writes a results folder named after the hardware (``results/gpu-check/1xH200-140GB`` by
default): ``env.json``, ``summary.json`` and ``summary.md`` (one line per step: pass /
fail / skip, seconds, the numbers it measured), ``logs/<step>.log`` (each command's
output) and ``steps/<step>/`` (each run's folder: result.json, checkpoints, figures,
benchmark JSON). Exit status: 0 every step passed or was skipped, 1 a step failed,
2 a required package is missing or the arguments are wrong. ``bench/README.md`` says what
each step checks.

Only the standard library is imported until the packages are known to be there, so a
missing one is named in one line (and, with ``--wheels DIR``, installed from DIR first).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

# import name -> pip name. Required: the suite does not run without them.
REQUIRED = {"torch": "torch", "numpy": "numpy", "pandas": "pandas",
            "matplotlib": "matplotlib", "PIL": "pillow", "tomli_w": "tomli-w",
            "tqdm": "tqdm", "pytest": "pytest", "pytest_benchmark": "pytest-benchmark"}
# Optional: the steps that need one are skipped, with one line saying so.
OPTIONAL = {"deepspeed": "deepspeed", "nvidia.dali": "nvidia-dali-cuda120",
            "pynvml": "nvidia-ml-py"}


# --------------------------------------------------------------------------- packages


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return False


def missing_packages(modules: dict[str, str]) -> list[str]:
    """The pip names of the modules in ``modules`` (import name -> pip name) that cannot
    be imported, found without importing them."""
    return [pip for mod, pip in modules.items() if not _importable(mod)]


def install_from_wheels(wheels: Path, packages: list[str], log: Callable[[str], None]) -> bool:
    """``pip install --no-index --find-links wheels packages``; True when pip succeeded."""
    if not packages:
        return True
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
           *packages]
    log(f"installing from {wheels}: {' '.join(packages)}")
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        tail = done.stdout.strip().splitlines()[-1:] or ["(no output)"]
        log(f"pip could not install them: {tail[0]}")
    importlib.invalidate_caches()
    return done.returncode == 0


def check_packages(wheels: Path | None, log: Callable[[str], None],
                   required: dict[str, str] = REQUIRED,
                   optional: dict[str, str] = OPTIONAL) -> tuple[str | None, list[str]]:
    """Make sure the packages are there, installing from ``wheels`` when given.

    Returns:
        ``(error, optional_missing)``: ``error`` is the one line naming the required
        packages still missing (``None`` when all are there).
    """
    need = missing_packages(required)
    want = missing_packages(optional)
    if wheels is not None and (need or want):
        if not wheels.is_dir():
            return f"--wheels {wheels} is not a folder", want
        # pip installs all or nothing: the required together, each optional one alone,
        # so an optional wheel missing from the folder cannot block the rest.
        install_from_wheels(wheels, need, log)
        for pip in want:
            install_from_wheels(wheels, [pip], log)
        need, want = missing_packages(required), missing_packages(optional)
    if need:
        hint = "pip install them" + ("" if wheels else ", or pass --wheels DIR with their wheels")
        return f"missing packages: {', '.join(need)} ({hint})", want
    return None, want


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one form of the check (GPU: meaningful numbers in minutes; CPU:
    the same code paths in seconds)."""

    image: int
    batch: int
    synthetic_images: int
    warmup: int
    measure: int
    epochs: int
    photo: tuple[int, int]  # (height, width) of the photo the predict step maps
    timing: dict[str, tuple[int, int]]  # name -> (image, batch) of the timing comparison
    timing_steps: int
    timing_rounds: int
    nproc: int  # DDP / DeepSpeed ranks
    step_timeout_s: int
    compile_widths: str | None  # None: the default model
    photos: int = 1  # photos the predict step maps (Mpx/s over all of them)
    decode_data: tuple[int, int, int] = (16, 96, 128)  # JPEG pairs (n, height, width)
    harness_filter: str = "tiny and fp32"  # bench/test_harness.py -k on this form


GPU_SIZES = Sizes(image=256, batch=16, synthetic_images=80, warmup=5, measure=30, epochs=2,
                  photo=(4096, 6144), timing={"small": (128, 2), "default": (128, 8)},
                  timing_steps=40, timing_rounds=3, nproc=2, step_timeout_s=300,
                  compile_widths=None, photos=3, decode_data=(96, 768, 1024),
                  harness_filter="bf16")
CPU_SIZES = Sizes(image=64, batch=2, synthetic_images=10, warmup=1, measure=4, epochs=1,
                  photo=(256, 384), timing={"small": (32, 1), "default": (64, 2)},
                  timing_steps=6, timing_rounds=2, nproc=2, step_timeout_s=300,
                  # Inductor's CPU compile time grows with the graph: two levels, not four.
                  compile_widths="8,16")


@dataclass
class StepResult:
    name: str
    status: str = "pass"  # pass | fail | skip
    seconds: float = 0.0
    detail: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)


class StepFailed(Exception):
    """A check of a step did not hold; the message says which."""


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise StepFailed(what)


class Check:
    """The context every step gets: device, sizes, folders, and command runners."""

    def __init__(self, device: str, sizes: Sizes, out: Path, optional_missing: list[str],
                 log: Callable[[str], None]) -> None:
        self.device, self.sizes, self.out, self.log = device, sizes, out, log
        self.optional_missing = optional_missing
        self.cuda = device == "cuda"
        self.env = dict(os.environ)
        if not self.cuda:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU form, even on a GPU machine
        self.gpus = 0
        self.products: dict[str, Path] = {}  # what one step leaves for another

    def step_dir(self, name: str) -> Path:
        path = self.out / "steps" / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def run(self, name: str, cmd: list[str], timeout: int | None = None) -> None:
        """Run ``cmd`` from the repository root, its output appended to logs/<name>.log."""
        logfile = self.out / "logs" / f"{name}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                done = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=f,
                                      stderr=subprocess.STDOUT,
                                      timeout=timeout or self.sizes.step_timeout_s)
            except subprocess.TimeoutExpired:
                raise StepFailed(f"timed out after {timeout or self.sizes.step_timeout_s} s "
                                 f"(see {logfile})") from None
        if done.returncode != 0:
            raise StepFailed(f"exit status {done.returncode}: {last_error(logfile)} "
                             f"(see {logfile})")

    def train(self, name: str, out: Path, args: list[str], nproc: int = 0) -> dict[str, Any]:
        """launch/train.py (under torchrun with ``nproc`` ranks); its result row."""
        cmd = [sys.executable]
        if nproc:
            cmd += ["-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc}"]
        self.run(name, cmd + ["launch/train.py", *args, "--out", str(out)])
        row = json.loads((out / "result.json").read_text())
        expect(row.get("status") == "ok", f"result row status {row.get('status')!r}")
        return row

    def common(self, loader: str = "torch", mode: str = "both") -> list[str]:
        z = self.sizes
        return ["--image-size", str(z.image), "--batch-size", str(z.batch),
                "--synthetic-images", str(z.synthetic_images), "--warmup-steps", str(z.warmup),
                "--measure-steps", str(z.measure), "--epochs", str(z.epochs),
                "--loader", loader, "--mode", mode]


def last_error(logfile: Path) -> str:
    """The most telling line of a failed command's log: an ``error:`` line, else the last."""
    lines = [ln.strip() for ln in logfile.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("error:") or "Error:" in ln:
            return ln[:300]
    return (lines[-1] if lines else "no output")[:300]


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_row(c: Check, row: dict[str, Any], accuracy: bool = False) -> dict[str, Any]:
    """What every ok training row must hold; returns the numbers worth showing."""
    expect(finite(row.get("throughput_img_s")) and row["throughput_img_s"] > 0,
           f"throughput {row.get('throughput_img_s')!r}")
    expect(row.get("measured_steps") == c.sizes.measure,
           f"measured_steps {row.get('measured_steps')} != {c.sizes.measure}")
    method = "cuda_events" if c.cuda else "host_clock"
    expect(row.get("timing_method") == method,
           f"timing_method {row.get('timing_method')!r}, expected {method}")
    expect(finite(row.get("train_loss_last")), f"train loss {row.get('train_loss_last')!r}")
    expect(finite(row.get("mem_train_mb")), f"mem_train_mb {row.get('mem_train_mb')!r}")
    if c.cuda:
        expect(row.get("peak_mem_source") == "allocator", "peak memory not from the allocator")
        expect(finite(row.get("mfu")) and finite(row.get("mfu_gemm")),
               f"mfu {row.get('mfu')!r} / mfu_gemm {row.get('mfu_gemm')!r}")
        expect(str(row.get("peak_tflops_source", "")).startswith("table:"),
               f"no datasheet peak for {row.get('device_name')!r} "
               f"({row.get('peak_tflops_source')}): add it to PEAK_TFLOPS_TABLE")
    out = {"img_s": row["throughput_img_s"], "step_ms_p50": row.get("step_ms_p50"),
           "data_wait_pct": row.get("data_wait_pct"), "mem_train_mb": row.get("mem_train_mb"),
           "mfu": row.get("mfu"), "mfu_gemm": row.get("mfu_gemm")}
    if accuracy:
        expect(finite(row.get("mIoU")), f"mIoU {row.get('mIoU')!r}")
        expect(finite(row.get("mem_val_mb")), f"mem_val_mb {row.get('mem_val_mb')!r}")
        out.update(mIoU=row["mIoU"], mem_val_mb=row["mem_val_mb"])
    return out


def check_artefacts(folder: Path, figures: bool = True) -> None:
    names = ["result.json", "metrics.json", "config.toml", "checkpoint.pt", "last.pt"]
    if figures:
        names += ["curves.png", "confusion.png", "samples.png"]
    missing = [n for n in names if not (folder / n).is_file()]
    expect(not missing, f"missing in {folder}: {', '.join(missing)}")
    import torch

    from segcore.train.checkpoint import load_checkpoint

    # Read raw: load_checkpoint strips wrapper prefixes, which would hide them.
    raw = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    prefixed = [k for k in raw["engine"]["model"] if k.startswith(("_orig_mod.", "module."))]
    expect(not prefixed, f"checkpoint keys carry wrapper prefixes: {prefixed[:2]}")
    load_checkpoint(folder / "checkpoint.pt")


# -- the steps, in the order they run --------------------------------------------------


def step_env(c: Check) -> dict[str, Any]:
    """Versions, device, CUDA math settings, NVML counters, CUDA events, the GEMM
    ceiling and the datasheet peak."""
    import torch

    from segcore.host import capture_env
    from segcore.io import write_json_atomic
    from segcore.train import telemetry

    env = capture_env()
    write_json_atomic(c.out / "env.json", env)
    nums: dict[str, Any] = {"torch": torch.__version__, "cuda": env.get("cuda_version"),
                            "cudnn": env.get("cudnn_version"), "nccl": env.get("nccl_version"),
                            "dali": env.get("dali_version"),
                            "deepspeed": env.get("deepspeed_version")}
    if not c.cuda:
        nums["cpu"] = env.get("cpu_model")
        gemm, source = telemetry.measured_gemm_tflops("cpu", "fp32")
        nums.update(gemm_tflops_fp32=round(gemm, 3), gemm_source=source)
        return nums
    expect(torch.cuda.is_available(), "torch sees no CUDA device (CUDA_VISIBLE_DEVICES? "
                                      "driver? a CPU-only torch wheel?)")
    dev = torch.device("cuda", 0)
    nums.update(gpu=torch.cuda.get_device_name(dev), gpus=c.gpus,
                capability=".".join(map(str, torch.cuda.get_device_capability(dev))))
    nums["cuda_math"] = telemetry.cuda_math()  # set by main(), as run.py sets it
    expect(nums["cuda_math"]["tf32_conv"] and nums["cuda_math"]["tf32_matmul"],
           f"TF32 did not switch on: {nums['cuda_math']}")
    if "nvidia-ml-py" in c.optional_missing:
        nums["nvml"] = "skipped: pynvml not importable"
    else:
        sampler = telemetry.NvmlSampler(0, interval_s=0.05).start()
        a = torch.randn(4096, 4096, device=dev)
        for _ in range(50):
            a = a @ a / 64
        torch.cuda.synchronize(dev)
        got = sampler.stop()
        expect(sampler.available, f"NVML: {sampler.error}")
        expect(got["device_mem_mb"] is not None, "NVML reported no device memory")
        nums["nvml"] = got
    marks = telemetry.CudaEventMarks(dev)
    t0 = marks.mark()
    torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time, queued without a wait
    t1 = marks.mark()
    host_free = not marks.done(t1)
    marks.wait(t1)
    nums["event_ms"] = round(marks.seconds(t0, t1) * 1e3, 2)
    expect(nums["event_ms"] > 1.0, f"CUDA events measured {nums['event_ms']} ms for a sleep")
    nums["host_ran_ahead"] = host_free
    for dt in ("bf16", "fp32"):
        spec, spec_src = telemetry.device_peak_tflops(dev, dt)
        gemm, gemm_src = telemetry.measured_gemm_tflops(dev, dt)
        nums[f"{dt}_spec_tflops"] = round(spec, 1)
        nums[f"{dt}_gemm_tflops"] = round(gemm, 1)
        nums[f"{dt}_gemm_of_spec"] = round(gemm / spec, 3)
        nums[f"{dt}_sources"] = f"{spec_src} | {gemm_src}"
    return nums


def step_precisions(c: Check) -> dict[str, Any]:
    """Single engine, synthetic on-device batches, fp32 / bf16 / fp16: throughput,
    timing method, loss, MFU against datasheet and GEMM ceiling."""
    nums = {}
    for p in ("fp32", "bf16", "fp16"):
        out = c.step_dir(f"precision-{p}")
        row = c.train("precisions", out, c.common("synthetic", "throughput")
                      + ["--precision", p, "--engine", "single"])
        got = check_row(c, row)
        nums[p] = {k: got[k] for k in ("img_s", "step_ms_p50", "mfu", "mfu_gemm")}
    return nums


def step_accuracy(c: Check) -> dict[str, Any]:
    """bf16 accuracy run on the torch loader: uint8 batches normalized on the device,
    worker processes, validation, per-phase memory, checkpoints and figures."""
    out = c.step_dir("accuracy")
    row = c.train("accuracy", out, c.common("torch", "both") + ["--precision", "bf16"])
    nums = check_row(c, row, accuracy=True)
    check_artefacts(out)
    if c.cuda:
        expect((row.get("loader_workers") or 0) >= 1,
               f"torch loader ran with {row.get('loader_workers')} workers on a GPU")
    nums["loader_workers"] = row.get("loader_workers")
    c.products["checkpoint"] = out / "checkpoint.pt"
    return nums


def step_ddp(c: Check) -> dict[str, Any]:
    """DDP under torchrun (NCCL on GPUs, gloo on CPU), torch loader, validation."""
    n = max(1, min(c.sizes.nproc, c.gpus)) if c.cuda else c.sizes.nproc
    out = c.step_dir("ddp")
    row = c.train("ddp", out, c.common("torch", "both") + ["--engine", "ddp"], nproc=n)
    nums = check_row(c, row, accuracy=True)
    backend = "nccl" if c.cuda else "gloo"
    expect(row.get("world_size") == n, f"world_size {row.get('world_size')} != {n}")
    expect(row.get("dist_backend") == backend,
           f"process group {row.get('dist_backend')!r}, expected {backend}")
    nums.update(world_size=n, backend=backend)
    return nums


def compare_timing(device: str, image: int, batch: int, steps: int, rounds: int,
                   warmup: int = 3, precision: str = "fp32") -> dict[str, Any]:
    """Throughput of the same training steps timed per step (a device synchronize at
    every mark: the old timer) and by window (CUDA events, one wait), in alternating
    windows, on the default model. On a CPU both are the host clock: the two numbers
    then differ only by noise."""
    import torch

    from segcore.config import ModelConfig, TrainConfig
    from segcore.model import build_model
    from segcore.train.engines.base import Engine
    from segcore.train.losses import segmentation_loss
    from segcore.train.telemetry import step_timer

    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 6).to(dev).to(memory_format=torch.channels_last)
    engine = Engine(model, TrainConfig(lr=1e-4, schedule="none", precision=precision),
                    dev, 10 ** 6)
    x = torch.randn(batch, 3, image, image, device=dev).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch, image, image), device=dev)

    def window(per_step: bool) -> float:
        timer = step_timer(warmup, dev, per_step_sync=per_step)
        for _ in range(warmup + steps):  # the Trainer's marks
            timer.begin()
            timer.data_ready()
            engine.backward(segmentation_loss(engine.forward(x), y, binary=False))
            timer.compute_done()
            engine.step()
            timer.end(batch)
        rate = timer.summary()["throughput_img_s"]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # no queue carried into the next window
        return rate

    rates: dict[str, list[float]] = {"per_step": [], "windowed": []}
    for r in range(rounds):
        order = ("per_step", "windowed") if r % 2 == 0 else ("windowed", "per_step")
        for mode in order:
            rates[mode].append(window(mode == "per_step"))
    a, b = statistics.median(rates["per_step"]), statistics.median(rates["windowed"])
    return {"per_step_img_s": round(a, 2), "windowed_img_s": round(b, 2),
            "windowed_over_per_step": round(b / a, 3), "image": image, "batch": batch,
            "precision": precision, "steps": steps, "rounds": rounds}


def step_timing(c: Check) -> dict[str, Any]:
    """Per-step synchronized vs windowed CUDA-event timing of the same steps: the
    throughput the old timer lost (small configurations lose most)."""
    nums = {}
    precision = "bf16" if c.cuda else "fp32"
    for name, (image, batch) in c.sizes.timing.items():
        got = compare_timing(c.device, image, batch, c.sizes.timing_steps,
                             c.sizes.timing_rounds, precision=precision)
        expect(finite(got["per_step_img_s"]) and finite(got["windowed_img_s"]),
               f"{name}: no throughput")
        nums[name] = got
    return nums


PREDICT_MPX_S_GOAL = 50.0  # end to end, default model, one H100/H200 (issue: feed the GPU)


def _predict_once(c: Check, ckpt: Path, photos: Path, out: Path, decode: str
                  ) -> dict[str, Any]:
    c.run("predict", [sys.executable, "launch/predict.py", "--checkpoint", str(ckpt),
                      "--images", str(photos), "--out", str(out),
                      "--device", c.device, "--precision", "bf16" if c.cuda else "fp32",
                      "--decode", decode, "--no-progress"])
    timing = json.loads((out / "timing.json").read_text())
    expect(timing.get("images") == c.sizes.photos,
           f"timing.json: {timing.get('images')} image(s), expected {c.sizes.photos}")
    expect(finite(timing.get("mpx_per_s")), f"timing.json: mpx_per_s {timing.get('mpx_per_s')!r}")
    expect(set(timing.get("busy_s", {})) >= {"decode", "infer", "stats", "write"},
           f"timing.json: stages {sorted(timing.get('busy_s', {}))}")
    return {"mpx_s": timing["mpx_per_s"], "wall_s": timing["wall_s"],
            "busy_s": timing["busy_s"], "cpu_fallbacks": timing.get("gpu_decode_cpu_fallbacks")}


def step_predict(c: Check) -> dict[str, Any]:
    """launch/predict.py on several photos (4096x6144 on a GPU): the pipelined run (reader
    ahead, counts on the device, writer pool), end-to-end Mpx/s and the stage split from
    timing.json, with CPU decode and (on CUDA) nvJPEG decode; goal on a GPU: >= 50 Mpx/s."""
    import numpy as np
    from PIL import Image

    from segcore.data.synthetic import generate_scene

    # This run's accuracy step, else an earlier run's (for --only predict).
    ckpt = c.products.get("checkpoint", c.out / "steps" / "accuracy" / "checkpoint.pt")
    expect(ckpt.is_file(), f"no {ckpt}: run the accuracy step first")
    out = c.step_dir("predict")
    photos = out / "photos"
    photos.mkdir()
    h, w = c.sizes.photo
    # A real scene at a quarter of the size, enlarged: scene content at photo size in
    # well under a second (generating 25 Mpx directly takes several).
    for i in range(c.sizes.photos):
        scene, _ = generate_scene(7 + i, max(64, h // 4), max(96, w // 4))
        Image.fromarray(np.asarray(scene)).resize((w, h), Image.BILINEAR).save(
            photos / f"photo{i}.jpg", quality=90)
    t0 = time.perf_counter()
    nums: dict[str, Any] = {"photos": f"{c.sizes.photos} x {w}x{h}"}
    nums["decode_cpu"] = _predict_once(c, ckpt, photos, out / "pred", "cpu")
    nums["seconds_with_startup"] = round(time.perf_counter() - t0, 1)
    classes = out / "pred" / "photo0_classes.png"
    expect(classes.is_file(), f"no {classes.name}")
    with Image.open(classes) as im:
        expect(im.size == (w, h), f"class map is {im.size}, photo is {(w, h)}")
    expect((out / "pred" / "surface_stats.csv").is_file(), "no surface_stats.csv")
    if c.cuda:
        nums["decode_gpu"] = _predict_once(c, ckpt, photos, out / "pred-gpu", "gpu")
        best = max(nums["decode_cpu"]["mpx_s"], nums["decode_gpu"]["mpx_s"])
        nums["goal_mpx_s"] = PREDICT_MPX_S_GOAL
        expect(best >= PREDICT_MPX_S_GOAL,
               f"end to end {best:.1f} Mpx/s < the {PREDICT_MPX_S_GOAL:g} Mpx/s goal "
               f"(stages: {nums['decode_cpu']['busy_s']})")
    else:  # the CPU form: --decode gpu must stop at start with one line
        logfile = c.out / "logs" / "predict.log"
        try:
            _predict_once(c, ckpt, photos, out / "pred-gpu", "gpu")
            raise StepFailed("--decode gpu ran on a machine without CUDA")
        except StepFailed as e:
            expect("exit status 2" in str(e) and "--decode gpu needs" in
                   logfile.read_text(), f"--decode gpu without CUDA: {e}")
        nums["decode_gpu"] = "refused at start without CUDA (one line, exit 2)"
    return nums


def step_decode(c: Check) -> dict[str, Any]:
    """Training on prepared JPEGs with the torch loader, decoded by the workers (--decode
    cpu) and on the device by nvJPEG (--decode gpu, CUDA only): data wait, the loader
    alone (loader_img_s, loader/step ratio); goal on a GPU: data wait <= 5 % with the
    better of the two."""
    from segcore.data.synthetic import write_dataset

    n, h, w = c.sizes.decode_data
    data = write_dataset(c.out / "steps" / "decode-data", n_images=n, height=h, width=w)
    nums: dict[str, Any] = {"dataset": f"{n} JPEGs {w}x{h}"}
    for decode in ("cpu", "gpu") if c.cuda else ("cpu",):
        out = c.step_dir(f"decode-{decode}")
        args = c.common("torch", "throughput") + ["--data", str(data), "--decode", decode,
                                                  "--precision", "bf16" if c.cuda else "fp32"]
        row = c.train("decode", out, args)
        got = check_row(c, row)
        expect(row.get("decode") == decode, f"row decode {row.get('decode')!r}")
        expect(finite(row.get("loader_img_s")) and row["loader_img_s"] > 0,
               f"loader_img_s {row.get('loader_img_s')!r}")
        nums[decode] = {"img_s": got["img_s"], "data_wait_pct": got["data_wait_pct"],
                        "loader_img_s": round(row["loader_img_s"], 1),
                        "loader_step_ratio": row.get("loader_step_ratio")}
    if c.cuda:
        best = min(nums[d]["data_wait_pct"] for d in ("cpu", "gpu"))
        expect(best <= 5.0, f"data wait {best:.1f} % with the better decode (goal <= 5 %)")
    return nums


GPU_MFU_GOALS = {"eager": 0.35, "compiled": 0.55}  # mfu_gemm on one H100/H200


def step_gpu_preset(c: Check) -> dict[str, Any]:
    """`launch/sweep.py --preset gpu`: widths 64-1024 at 512 px, bf16, channels-last,
    eager and compiled, the batch found by the memory probe; goals on a GPU: mfu_gemm >=
    0.35 eager and >= 0.55 compiled. The CPU form checks the plan (--dry-run)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    out = c.step_dir("gpu-preset")
    cmd = [sys.executable, "launch/sweep.py", "--preset", "gpu", "--gpus", "1",
           "--out", str(out)]
    if not c.cuda:
        c.run("gpu-preset", cmd + ["--dry-run"])
        configs = sorted((out / "configs").glob("*.toml"))
        expect(len(configs) == 2, f"{len(configs)} planned job(s), expected eager + compiled")
        plans = [tomllib.loads(p.read_text()) for p in configs]
        for cfg in plans:
            expect(cfg["model"]["widths"] == [64, 128, 256, 512, 1024],
                   f"widths {cfg['model']['widths']}")
            expect(cfg["data"]["image_size"] == 512 and cfg["train"]["precision"] == "bf16",
                   f"crop {cfg['data']['image_size']}, precision {cfg['train']['precision']}")
        expect({cfg["model"]["compile"] for cfg in plans} == {False, True}, "compile axis")
        return {"planned": [p.stem for p in configs], "mode": "--dry-run (no GPU)"}
    c.run("gpu-preset", cmd, timeout=420)
    import csv

    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expect(rows and all(r["status"] == "ok" for r in rows),
           f"gpu preset rows: {[(r.get('run_id'), r.get('status')) for r in rows]}")
    nums: dict[str, Any] = {}
    for r in rows:
        kind = "compiled" if r.get("compile") in ("True", "true", "1") else "eager"
        mfu = float(r.get("mfu_gemm") or "nan")
        nums[kind] = {"img_s": round(float(r["throughput_img_s"]), 1),
                      "mfu_gemm": round(mfu, 3), "batch": r.get("batch_size"),
                      "batch_source": r.get("batch_source")}
        expect(r.get("batch_source") == "probe",
               f"{kind}: batch from {r.get('batch_source')!r}, not the memory probe")
        expect(mfu >= GPU_MFU_GOALS[kind],
               f"{kind}: mfu_gemm {mfu:.3f} < the {GPU_MFU_GOALS[kind]} goal")
    return nums


HARNESS_GOAL = 0.98  # segbench step / bare loop throughput, GPU and CPU


def step_harness(c: Check) -> dict[str, Any]:
    """bench/test_harness.py: segbench's training step against a bare PyTorch loop,
    interleaved in one run; goal segbench/bare >= 0.98 (checked on a GPU; printed on
    the CPU form, whose tiny step is noise-bound on a shared host)."""
    out = c.step_dir("harness")
    report = out / "harness.json"
    c.run("harness", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                      "bench/test_harness.py", "-k", c.sizes.harness_filter,
                      f"--benchmark-json={report}"], timeout=420 if c.cuda else None)
    data = json.loads(report.read_text())
    ratios = {b["name"]: b["extra_info"].get("segbench_over_bare")
              for b in data["benchmarks"]}
    expect(ratios and all(finite(v) for v in ratios.values()),
           f"no segbench/bare ratio in {report.name}: {ratios}")
    if c.cuda:
        low = {k: v for k, v in ratios.items() if v < HARNESS_GOAL}
        expect(not low, f"segbench/bare below {HARNESS_GOAL}: {low}")
    return {"segbench_over_bare": {k: round(v, 3) for k, v in ratios.items()},
            "goal": HARNESS_GOAL}


def step_wall(c: Check) -> dict[str, Any]:
    """Wall clock beside steady state: a throughput run over several epochs of the torch
    loader writes no checkpoint and records wall_throughput_img_s and
    measured_time_share (the report flags a share below 0.8)."""
    out = c.step_dir("wall")
    row = c.train("wall", out, c.common("torch", "throughput"))
    nums = check_row(c, row)
    for k in ("wall_throughput_img_s", "measured_time_share"):
        expect(finite(row.get(k)) and row[k] > 0, f"{k} {row.get(k)!r}")
    expect(row["measured_time_share"] <= 1.05, f"share {row['measured_time_share']:.3f} > 1")
    left = [n for n in ("checkpoint.pt", "last.pt") if (out / n).exists()]
    expect(not left, f"a throughput run wrote {left}")
    return {"img_s": nums["img_s"], "wall_img_s": round(row["wall_throughput_img_s"], 1),
            "measured_time_share": round(row["measured_time_share"], 3)}


def step_benchmarks(c: Check) -> dict[str, Any]:
    """The benchmark suite on the device with the training's cuDNN/TF32 settings (the
    CPU form runs each body once: --benchmark-disable checks the outputs)."""
    out = c.step_dir("benchmarks")
    report = out / "bench.json"
    if c.cuda:
        files = ["bench/test_train_step.py", "bench/test_inference.py",
                 "bench/test_kernels.py", "bench/test_loaders.py"]
        # prepare and JPEG decode are host work, timed by the CPU suite; torch.compile
        # is checked by the compile step (its benchmark would add a minute of compiling).
        extra = ["--benchmark-only", "-k", "not prepare and not compile",
                 f"--benchmark-json={report}"]
    else:
        files = ["bench/test_kernels.py", "bench/test_inference.py"]
        extra = ["--benchmark-disable", "-k", "inference_forward or confusion or remap"]
    c.run("benchmarks", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         *files, *extra], timeout=420 if c.cuda else None)
    if not c.cuda:
        return {"mode": "--benchmark-disable (outputs checked)"}
    data = json.loads(report.read_text())
    math_ = data["machine_info"]["segbench"].get("cuda_math") or {}
    expect(math_.get("cudnn_benchmark") and math_.get("tf32_conv"),
           f"benchmarks did not run with the training's CUDA math: {math_}")
    rates = {b["name"]: round(b["extra_info"].get("img_per_s", 0.0), 1)
             for b in data["benchmarks"] if "img_per_s" in b.get("extra_info", {})}
    return {"benchmarks": len(data["benchmarks"]), "cuda_math": math_, "img_s": rates}


def step_sweep(c: Check) -> dict[str, Any]:
    """The smoke sweep: one torchrun job per configuration, rows, plots, report."""
    out = c.step_dir("sweep")
    c.run("sweep", [sys.executable, "launch/sweep.py", "--preset", "smoke", "--gpus", "1",
                    "--out", str(out)])
    import csv

    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expect(rows and all(r["status"] == "ok" for r in rows),
           f"sweep rows: {[r.get('status') for r in rows]}")
    expect((out / "report.md").is_file(), "no report.md")
    return {"rows": len(rows), "img_s": [round(float(r["throughput_img_s"]), 1) for r in rows]}


def _deepspeed(c: Check, name: str, stage: int, precision: str) -> dict[str, Any]:
    n = max(1, min(c.sizes.nproc, c.gpus)) if c.cuda else 1
    out = c.step_dir(name)
    row = c.train(name, out, c.common("torch", "both")
                  + ["--engine", "deepspeed", "--zero-stage", str(stage),
                     "--precision", precision], nproc=n)
    nums = check_row(c, row, accuracy=True)
    check_artefacts(out)
    # DeepSpeed keeps NCHW weights: the row must say the run was NCHW, not channels-last.
    expect(row.get("channels_last") is False,
           f"row says channels_last={row.get('channels_last')} for DeepSpeed")
    nums.update(ranks=n, precision=precision)
    return nums


def step_zero2(c: Check) -> dict[str, Any]:
    """DeepSpeed ZeRO-2 in bf16 with validation, checkpoints, figures, an honest
    memory-format column (CPU form: fp32, see bench/README.md)."""
    return _deepspeed(c, "zero2", 2, "bf16" if c.cuda else "fp32")


def step_zero3(c: Check) -> dict[str, Any]:
    """DeepSpeed ZeRO-3 in fp16 (dynamic loss scaling) with validation: gathered weights
    for evaluation and checkpoints (CPU form: fp32, see bench/README.md)."""
    return _deepspeed(c, "zero3", 3, "fp16" if c.cuda else "fp32")


def step_compile(c: Check) -> dict[str, Any]:
    """--compile under DeepSpeed: checkpoint keys without _orig_mod., figures drawn, and
    --resume continues the run."""
    out = c.step_dir("compile")
    n = 1
    args = c.common("torch", "accuracy") + ["--engine", "deepspeed", "--zero-stage", "2",
                                            "--compile", "--epochs", "1"]
    if c.sizes.compile_widths:
        args += ["--widths", c.sizes.compile_widths]
    row = c.train("compile", out, args, nproc=n)
    expect(row.get("compile") is True, "row does not record compile")
    check_artefacts(out)
    c.run("compile", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc-per-node={n}", "launch/train.py", "--resume", "--epochs", "2",
                      "--out", str(out)])
    history = json.loads((out / "metrics.json").read_text())["history"]
    expect(len(history) == 2, f"--resume: {len(history)} epoch(s) in the history, expected 2")
    return {"epochs_after_resume": len(history), "mIoU": row.get("mIoU")}


def step_dali(c: Check) -> dict[str, Any]:
    """The DALI loader (GPU decode with device "mixed" on CUDA, CPU pipeline otherwise)."""
    out = c.step_dir("dali")
    row = c.train("dali", out, c.common("dali", "both"))
    nums = check_row(c, row, accuracy=True)
    nums["dali_mem_mb"] = row.get("dali_mem_mb")
    return nums


STEPS: list[tuple[str, Callable[[Check], dict[str, Any]], str | None]] = [
    ("env", step_env, None),
    ("precisions", step_precisions, None),
    ("accuracy", step_accuracy, None),
    ("ddp", step_ddp, None),
    ("timing", step_timing, None),
    ("wall", step_wall, None),
    ("harness", step_harness, None),
    ("gpu-preset", step_gpu_preset, None),
    ("predict", step_predict, None),
    ("decode", step_decode, None),
    ("benchmarks", step_benchmarks, None),
    ("sweep", step_sweep, None),
    ("zero2", step_zero2, "deepspeed"),
    ("zero3", step_zero3, "deepspeed"),
    ("compile", step_compile, "deepspeed"),
    ("dali", step_dali, "nvidia-dali-cuda120"),
]


# --------------------------------------------------------------------------- driver


def default_out(device: str) -> Path:
    """``results/gpu-check/<hardware tag>``: the GPU's name, or the CPU's for --device cpu."""
    from segcore.host import capture_env, hardware_tag

    env = capture_env()
    if device == "cpu":
        env = {**env, "cuda_devices": [], "nvml_gpus": []}
    return REPO / "results" / "gpu-check" / hardware_tag(env)


def run_steps(c: Check, names: list[str], log: Callable[[str], None]) -> list[StepResult]:
    results = []
    todo = [s for s in STEPS if s[0] in names]
    for k, (name, fn, needs) in enumerate(todo, 1):
        res = StepResult(name)
        t0 = time.perf_counter()
        if needs is not None and needs in c.optional_missing:
            res.status, res.detail = "skip", f"skipped: {needs} is not importable"
        else:
            try:
                res.numbers = fn(c)
            except StepFailed as e:
                res.status, res.detail = "fail", str(e)
            except Exception as e:  # a step's own bug must not stop the other steps
                res.status, res.detail = "fail", f"{type(e).__name__}: {e}"
        res.seconds = time.perf_counter() - t0
        results.append(res)
        shown = res.detail or compact(res.numbers)
        log(f"[{k:2d}/{len(todo)}] {name:<11} {res.status:<4} {res.seconds:6.1f} s  {shown}")
    return results


def compact(numbers: dict[str, Any], limit: int = 160) -> str:
    text = json.dumps(numbers, default=str, separators=(",", ":"))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def write_summary(c: Check, results: list[StepResult], total_s: float) -> None:
    from segcore.io import write_json_atomic, write_text_atomic

    doc = {"device": c.device, "total_s": total_s, "sizes": c.sizes.__dict__,
           "steps": [r.__dict__ for r in results]}
    write_json_atomic(c.out / "summary.json", doc)
    lines = [f"# gpu_check on {c.out.name} ({c.device}), {total_s:.0f} s", "",
             "| step | status | seconds | result |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | "
                     f"{(r.detail or compact(r.numbers, 400)).replace('|', '/')} |")
    write_text_atomic(c.out / "summary.md", "\n".join(lines) + "\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default): the acceptance run; cpu: the same steps in their "
                        "CPU form, with tiny sizes (checks the script itself)")
    p.add_argument("--out", type=Path, help="results folder (default: results/gpu-check/"
                                            "<hardware>)")
    p.add_argument("--wheels", type=Path,
                   help="folder of wheels to install missing packages from (pip --no-index)")
    p.add_argument("--only", help="comma-separated steps to run (default: all)")
    p.add_argument("--skip", help="comma-separated steps to leave out")
    p.add_argument("--list", action="store_true", help="list the steps and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    names = [s[0] for s in STEPS]
    if a.list:
        for name, fn, needs in STEPS:
            log(f"{name:<11} {(fn.__doc__ or '').split(chr(10))[0]}"
                + (f" (needs {needs})" if needs else ""))
        return 0
    for flag in ("only", "skip"):
        value = getattr(a, flag)
        unknown = [s for s in (value or "").split(",") if s and s not in names]
        if unknown:
            log(f"gpu_check: --{flag} {','.join(unknown)}: unknown step(s); choose from "
                f"{', '.join(names)}")
            return 2
    if a.only:
        names = [n for n in names if n in a.only.split(",")]
    if a.skip:
        names = [n for n in names if n not in a.skip.split(",")]
    error, optional_missing = check_packages(a.wheels, log)
    if error:
        log(f"gpu_check: {error}")
        return 2
    sys.path.insert(0, str(REPO))
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        log("gpu_check: no CUDA device is visible to torch (driver, CUDA_VISIBLE_DEVICES, or "
            "a CPU-only torch wheel); use --device cpu to check the script on a CPU")
        return 2
    if a.device == "cuda":
        from segcore.train.telemetry import set_cuda_math

        set_cuda_math(tf32=True, cudnn_benchmark=True)  # the in-process steps, as training
    out = (a.out or default_out(a.device)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    for old in (out / "logs").glob("*.log"):
        old.unlink()  # each run's logs only
    sizes = GPU_SIZES if a.device == "cuda" else CPU_SIZES
    c = Check(a.device, sizes, out, optional_missing, log)
    c.gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    for pip in optional_missing:
        log(f"note: {pip} is not importable: the steps that need it are skipped")
    log(f"gpu_check: {len(names)} step(s) on {a.device}, results in {out}")
    t0 = time.perf_counter()
    results = run_steps(c, names, log)
    total = time.perf_counter() - t0
    write_summary(c, results, total)
    failed = [r.name for r in results if r.status == "fail"]
    log(f"gpu_check: {len(results) - len(failed)}/{len(results)} step(s) passed or skipped "
        f"in {total:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else "")
        + f"; summary: {out / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
