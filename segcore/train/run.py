"""Run one configuration end to end and produce its result row and artefacts.

``launch/train.py`` turns flags (or a sweep's ``configs/<run-id>.toml``) into a
:class:`~segcore.config.RunConfig` and calls :func:`run`; the sweep launches that script
once per configuration under torchrun.
"""

from __future__ import annotations

import datetime
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from segcore.config import (ConfigError, DataConfig, RunConfig, check_resolved, dump_config,
                            resolve)
from segcore.data.classes import ClassScheme, scheme_for
from segcore.data.dataset import (DeviceBatches, SegDataset, SyntheticBatches,
                                  default_num_workers, loader_throughput, make_eval_loader,
                                  make_train_loader, prefetch_factor)
from segcore.data.layouts import DatasetIndex, discover, validate
from segcore.dist import (DistContext, all_reduce_sum, gather_objects, init_distributed,
                          teardown)
from segcore.faults import interruption
from segcore.train.energy import EnergyCounter
from segcore.model import build_model, check_input_size, valid_side_at_most
from segcore.registry import engine_spec
from segcore.columns import config_columns, row_channels_last
from segcore.train.engines import build_engine
from segcore.train.trainer import Diverged, Trainer, TrainResult, step_budget

Log = Callable[[str], None]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from segcore.host import cpu_model

    return cpu_model()


def resolve_dataset(cfg: RunConfig, ctx: DistContext, log: Log) -> DatasetIndex:
    """The dataset index; the synthetic set is generated once (by the primary rank). A
    dataset folder's files are checked before training (a zero-byte, truncated or corrupt
    image or mask, a size mismatch): each bad pair is named on one line and skipped, and
    counted in the row (``skipped_pairs``), or, with ``--strict``, stops the run."""
    d = cfg.data
    if d.source == "synthetic":
        from segcore.data.synthetic import default_root, write_dataset

        root = default_root(d.synthetic_images, d.synthetic_height, d.synthetic_width,
                            d.split_seed)
        if ctx.is_primary:
            t = time.perf_counter()
            write_dataset(root, d.synthetic_images, d.synthetic_height, d.synthetic_width,
                          seed=d.split_seed)
            log(f"synthetic dataset: {d.synthetic_images} scenes {d.synthetic_width}x"
                f"{d.synthetic_height} at {root} ({time.perf_counter() - t:.1f}s)")
        if ctx.distributed:
            torch.distributed.barrier()
        return discover(root, strict=d.strict)
    with warnings.catch_warnings(record=True):  # said below, one line per file
        warnings.simplefilter("always")
        index = discover(d.source, strict=d.strict)
        validate(index, check_values=False, strict=d.strict)
    for problem in index.problems:
        log(f"warning: skipped: {problem}")
    return index


def class_weights_from(ds: SegDataset, num_classes: int) -> torch.Tensor:
    """Median-frequency balancing weights from the training masks' pixel counts."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for i in range(len(ds)):
        m = ds.load(i)[1]
        counts += np.bincount(m[m < num_classes].ravel(), minlength=num_classes)
    freq = counts / max(1, counts.sum())
    present = freq > 0
    w = np.zeros(num_classes)
    w[present] = np.median(freq[present]) / freq[present]
    return torch.tensor(w, dtype=torch.float32)


def _val_crop(index: DatasetIndex, samples, cfg: RunConfig) -> tuple[int, int]:
    """Common validation size: the smallest image, cut to a size the model accepts."""
    from PIL import Image

    hs, ws = [], []
    for s in samples:
        with Image.open(s.image) as im:
            ws.append(im.width)
            hs.append(im.height)
    h = valid_side_at_most(cfg.model, min(hs))
    w = valid_side_at_most(cfg.model, min(ws))
    check_input_size(cfg.model, h, w)
    return h, w


def check_decode(d: DataConfig, device: torch.device) -> None:
    """``--decode gpu``: fail at start, in one line, where JPEGs cannot be decoded on
    ``device`` (no CUDA, no torchvision with nvJPEG); nothing to check for ``cpu``.

    Raises:
        ConfigError: what is missing, and ``--decode cpu`` as the way out.
    """
    if d.decode == "gpu":
        from segcore.data.nvjpeg import check_gpu_decode

        check_gpu_decode(device)


def build_loaders(cfg: RunConfig, ctx: DistContext, scheme: ClassScheme, log: Log):
    """Train and validation loaders for the configured loader type."""
    d, tc = cfg.data, cfg.train
    check_decode(d, ctx.device)  # before the dataset is read or generated
    index = resolve_dataset(cfg, ctx, log)
    train_s, val_s = index.split(d.test_fraction, d.split_seed)
    crop = (d.image_size, d.image_size)
    check_input_size(cfg.model, *crop)
    if d.loader != "synthetic":  # synthetic batches are made on the device at any size
        _check_crop_fits(train_s, d.image_size)
    per_worker = tc.per_worker_batch
    # uint8 batches cross to the device and are normalized there (DeviceBatches).
    workers = (d.num_workers if d.num_workers is not None
               else default_num_workers(ctx.device, ctx.local_world_size))
    pin, cl = ctx.device.type == "cuda", cfg.model.channels_last
    val_ds = SegDataset(index, val_s, scheme, _val_crop(index, val_s, cfg), train=False,
                        raw=True)
    val_loader = DeviceBatches(make_eval_loader(val_ds, per_worker, ctx.rank, ctx.world_size,
                                                num_workers=workers, pin_memory=pin),
                               ctx.device, cl)
    dataset_class = SegDataset
    if d.loader == "torch" and d.decode == "gpu":
        from segcore.data.gpu_loader import JpegCrops as dataset_class
    train_ds = dataset_class(index, train_s, scheme, crop, train=True, augment=d.augment,
                             seed=tc.seed, raw=True)
    if len(train_ds) < per_worker * ctx.world_size:
        raise ConfigError(f"the training split has {len(train_ds)} images, fewer than one "
                          f"global batch ({per_worker} x {ctx.world_size} workers); lower "
                          "--batch-size or use more images")
    if d.loader == "synthetic":
        steps = len(train_ds) // (per_worker * ctx.world_size)
        train_loader = SyntheticBatches(per_worker, crop, scheme.num_classes, ctx.device,
                                        steps, seed=tc.seed + ctx.rank,
                                        channels_last=cfg.model.channels_last)
    elif d.loader == "dali":
        from segcore.data.dali import make_dali_train_loader

        train_loader = make_dali_train_loader(index, train_s, scheme, crop, per_worker,
                                              ctx, seed=tc.seed, augment=d.augment)
    elif d.decode == "gpu":
        from segcore.data.gpu_loader import make_gpu_decode_train_loader

        train_loader = make_gpu_decode_train_loader(
            train_ds, per_worker, ctx.rank, ctx.world_size, seed=tc.seed, device=ctx.device,
            num_workers=workers, pin_memory=pin, channels_last=cl)
    else:
        train_loader = DeviceBatches(
            make_train_loader(train_ds, per_worker, ctx.rank, ctx.world_size, seed=tc.seed,
                              num_workers=workers, pin_memory=pin), ctx.device, cl)
    return index, train_ds, train_loader, val_loader, len(train_s), len(val_s)


def _check_crop_fits(samples, size: int) -> None:
    """A crop larger than every image is mostly padding and can take unbounded memory."""
    from PIL import Image

    largest = 0
    for s in samples:
        with Image.open(s.image) as im:
            largest = max(largest, im.width, im.height)
    if size > largest:
        raise ConfigError(f"--image-size {size} is larger than every training image (the "
                          f"largest side is {largest} px): choose at most {largest}, or "
                          "prepare the dataset at a higher resolution")


def _gather_memory(ctx: DistContext, nvml: dict[str, Any], baseline_mb: float,
                   phases: dict[str, float | None],
                   dali_mb: float | None = None) -> dict[str, Any]:
    """Memory columns, max over ranks.

    ``phases`` (:class:`~segcore.train.telemetry.PhasePeaks`) keeps the peaks of warm-up
    (cuDNN autotuning, compile), training after warm-up and validation apart:
    ``mem_workload_mb``, the figure memory plots use, is the largest phase's (named in
    ``mem_workload_phase``; each phase has its own ``mem_<phase>_mb``). On CUDA
    the phases are allocator peaks; on CPU the peak RSS above the baseline taken after
    imports and model build (the RSS is mostly the library, ~600 MB of imports).
    ``dali_mb``: DALI's own buffers, which the torch allocator does not see."""
    from segcore.train import telemetry

    alloc = telemetry.allocator_peak_mb(ctx.device)
    host = telemetry.host_peak_rss_mb()
    overall = phases.get("overall_mb")
    # The phases reset the peak marks: the whole run's peak is the largest phase's.
    if overall is not None and alloc is not None:
        alloc = max(alloc, overall)
    elif overall is not None:
        host = max(host, baseline_mb + overall)
    mine = {"alloc": alloc, "host_peak": host, "host_now": telemetry.host_rss_mb(),
            "baseline": baseline_mb, "workload": max(0.0, host - baseline_mb),
            "dali": dali_mb, **{f"phase_{k}": v for k, v in phases.items()}, **nvml}
    rows = gather_objects(mine)

    def mx(key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return max(vals) if vals else None

    peak = mx("alloc")
    per_phase = {k: mx(f"phase_{k}_mb") for k in ("warmup", "train", "val")}
    measured = [v for v in per_phase.values() if v is not None]
    return {"peak_mem_mb": peak if peak is not None else mx("host_peak"),
            "peak_mem_source": "allocator" if peak is not None else "host_peak_rss",
            "host_rss_mb": mx("host_now"), "host_peak_rss_mb": mx("host_peak"),
            "mem_baseline_mb": mx("baseline"),
            # A run needs the memory of its hungriest phase (validation often peaks
            # above training): the maximum over phases, the phases beside it.
            "mem_workload_mb": max(measured) if measured else (
                peak if peak is not None else mx("workload")),
            "mem_workload_phase": (max(per_phase, key=lambda k: per_phase[k] or -1.0)
                                   if measured else None),
            **{f"mem_{k}_mb": v for k, v in per_phase.items()}, "dali_mem_mb": mx("dali"),
            "device_mem_mb": mx("device_mem_mb"), "gpu_util_pct": mx("gpu_util_pct"),
            "power_w": mx("power_w")}


def conditions(cfg: RunConfig, ctx: DistContext) -> dict[str, Any]:
    """What the hardware allows for this run: oversubscription and emulated precision,
    as row columns (the analysis flags such rows; the console says so at the start)."""
    from segcore.host import oversubscription, parallel_limit
    from segcore.precision import native_precision

    gpus = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    threads = torch.get_num_threads() if ctx.device.type == "cpu" else 1
    over = oversubscription(ctx.local_world_size, threads, gpus)
    native, why = native_precision(cfg.train.precision, ctx.device)
    return {"oversubscribed": bool(over), "oversubscribed_why": over or None,
            "hw_parallel_limit": parallel_limit(threads, gpus) * ctx.nnodes,
            "precision_emulated": not native, "precision_why": why}


def build_row(cfg: RunConfig, ctx: DistContext, res: TrainResult,
              flops_per_image: int | None, extra: dict[str, Any]) -> dict[str, Any]:
    """One row of the results schema (DESIGN.md section 4)."""
    from segcore.train import telemetry

    t = res.timing
    row: dict[str, Any] = {"sweep_id": cfg.sweep_id, "run_id": cfg.run_id, "status": "ok",
                           "error": ""}
    row.update(config_columns(cfg, nnodes=ctx.nnodes, device_type=ctx.device.type,
                              device_name=device_name(ctx.device)))
    row["threads_per_worker"] = torch.get_num_threads() if ctx.device.type == "cpu" else None
    # TF32 changes fp32 numerics on Ampere and later: recorded with the row.
    math_ = telemetry.cuda_math() if ctx.device.type == "cuda" else {}
    row["tf32"] = (cfg.train.precision == "fp32"
                   and bool(math_.get("tf32_conv") or math_.get("tf32_matmul")))
    row["cudnn_benchmark"] = math_.get("cudnn_benchmark")
    for k in ("warmup_steps", "measured_steps", "throughput_img_s", "throughput_ci95_lo",
              "throughput_ci95_hi", "throughput_ci95_pct", "ci_batches", "step_ms_p50",
              "step_ms_p90", "step_ms_p99", "step_ms_mean", "step_ms_std", "data_wait_pct",
              "fwd_bwd_ms_p50", "optim_ms_p50", "timing_method", "wall_throughput_img_s",
              "measured_time_share"):
        row[k] = t.get(k)
    row["speedup"] = None  # filled by the sweep's analysis against the 1-worker row
    row["scaling_efficiency"] = None
    row["tflops"] = row["mfu"] = None
    thr = t.get("throughput_img_s")
    if flops_per_image and thr and thr == thr:
        peak, source = telemetry.device_peak_tflops(ctx.device, cfg.train.precision)
        achieved, frac = telemetry.mfu(thr, flops_per_image, peak, n_devices=ctx.world_size)
        row.update(tflops=achieved, mfu=frac, peak_tflops=peak * ctx.world_size,
                   peak_tflops_source=source, train_gflops_per_image=flops_per_image / 1e9)
        # MFU against the datasheet (above) and against what a large GEMM reaches here:
        # these U-Nets cannot feed tensor cores like a GEMM, so both are recorded.
        gemm, gemm_source = telemetry.measured_gemm_tflops(ctx.device, cfg.train.precision)
        row.update(mfu_gemm=telemetry.mfu(thr, flops_per_image, gemm, ctx.world_size)[1],
                   gemm_tflops=gemm * ctx.world_size, gemm_tflops_source=gemm_source)
    row.update(extra)
    m = res.metrics or {}
    losses = res.step_losses
    tail = max(1, len(losses) // 10)  # first and last tenth of the steps, for convergence
    row.update(epochs=res.epochs, steps=res.steps, train_time_s=res.train_time_s,
               samples_seen=res.steps * cfg.train.global_batch_size,
               time_to_target_s=res.time_to_target_s, target_miou=cfg.train.target_miou,
               stopped_early=res.stopped_early, val_loss=m.get("val_loss"),
               aAcc=m.get("aAcc"), mIoU=m.get("mIoU"), mDice=m.get("mDice"),
               mAcc=m.get("mAcc"),
               train_loss_first=float(np.mean(losses[:tail])) if losses else None,
               train_loss_last=float(np.mean(losses[-tail:])) if losses else None)
    sch = scheme_for(cfg.data)
    # The study's columns: F1 of the positive class (binary) or the macro F1, and the
    # mean of the normalized confusion diagonal (segcore.results.study defines them).
    row["F1"] = m.get(f"Dice.{sch.names[1]}") if sch.is_binary else m.get("mDice")
    row["mConfDiag"] = m.get("mConfDiag")
    row["mAP"], row["mAUC"] = m.get("mAP"), m.get("mAUC")
    for name in sch.names:
        row[f"IoU.{name}"] = m.get(f"IoU.{name}")
    return row


@dataclass
class _Setup:
    """What :func:`_setup` builds for one run and :func:`_fit` / :func:`_write` use."""

    cfg: RunConfig
    ctx: DistContext
    out: Path
    scheme: ClassScheme
    conditions: dict[str, Any]
    index: DatasetIndex
    train_loader: Any
    val_loader: Any
    engine: Any
    trainer: Trainer
    flops: float | None
    val_images: int | None = None  # what the accuracy figures rest on


def run(cfg: RunConfig, log: Log = print,
        resume_state: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Train and evaluate one configuration; the primary rank writes ``cfg.out``.

    Args:
        cfg: the configuration: a resolved one (the sweep's) is checked against the
            launcher's world size; any other is resolved here for it.
        log: progress lines (the primary rank's).
        resume_state: a checkpoint (``segcore.train.checkpoint``) to continue from.

    Returns:
        The result row on the primary rank, ``None`` on the others.
    """
    started_at = _utc_now()
    ctx = init_distributed(cfg.train.timeout_s, cfg.train.threads,
                           need_group=engine_spec(cfg.train.engine).needs_group)
    try:
        say: Log = log if ctx.is_primary else (lambda _m: None)
        s = _setup(cfg, ctx, say, resume_state)
        try:
            res, extra = _fit(s)
        except Diverged as e:
            _write_stopped(s, "diverged", str(e), diverged_step=e.step,
                           last_finite_loss=e.last_finite_loss)
            raise
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (faults.Terminated)
            _write_stopped(s, "interrupted", f"stopped by {interruption(e)} at step "
                           f"{s.trainer.step}; checkpoints written are kept: continue with "
                           f"--resume --out {s.out}", rerun_on_resume=True)
            raise
        extra.update(started_at=started_at, finished_at=_utc_now())
        return _write(s, res, extra, say)
    finally:
        teardown()


def _setup(cfg: RunConfig, ctx: DistContext, say: Log,
           resume_state: dict[str, Any] | None) -> _Setup:
    """Check or resolve the configuration, then data, model, engine and Trainer; the
    primary rank writes ``config.toml`` (the configuration used, after any resume)."""
    from segcore.train import telemetry

    if cfg.resolved:  # by the sweep's driver: checked here, not resolved again
        check_resolved(cfg, ctx.world_size)
    else:
        cfg, notes = resolve(cfg, ctx.world_size)
        for note in notes:
            say(f"note: {note}")
    out = Path(cfg.out)
    if ctx.is_primary:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    if ctx.device.type == "cuda":
        telemetry.set_cuda_math(tf32=True, cudnn_benchmark=True)
    cond = conditions(cfg, ctx)
    where = (f"{ctx.world_size} CPU worker process(es) x {torch.get_num_threads()} "
             "thread(s) — CPU timings show code paths and relative effects, not GPU "
             "performance" if ctx.device.type == "cpu"
             else f"{ctx.world_size} x {device_name(ctx.device)}")
    scheme = scheme_for(cfg.data)
    say(f"run {cfg.run_id or out.name}: {cfg.model.arch} U-Net widths "
        f"{list(cfg.model.widths)}, {scheme.name} classes ({scheme.num_classes}), "
        f"engine {cfg.train.engine}, {cfg.train.precision}, on {where}")
    if cond["oversubscribed"]:
        say(f"warning: oversubscribed: {cond['oversubscribed_why']}; the row is flagged")
    if cond["precision_emulated"]:
        say(f"warning: {cfg.train.precision} is emulated: {cond['precision_why']}; the "
            "row is flagged")
    (index, train_ds, train_loader, val_loader,
     n_train, n_val) = build_loaders(cfg, ctx, scheme, say)
    tc = cfg.train
    say(f"data: {n_train} train / {n_val} validation images, crop "
        f"{cfg.data.image_size}, loader {cfg.data.loader}, batch "
        f"{tc.per_worker_batch}/worker ({tc.global_batch_size} global), lr "
        f"{tc.effective_lr:.3g} ({tc.lr_scaling} scaling of {tc.lr:.3g})")
    model = build_model(cfg.model, scheme.num_classes, binary=scheme.is_binary)
    flops = None
    try:
        flops = telemetry.train_flops_per_image(
            model, (3, cfg.data.image_size, cfg.data.image_size))
    except Exception as e:  # FLOP counting is telemetry: never fail the run for it
        say(f"warning: FLOP count unavailable ({type(e).__name__}: {e})")
    model = model.to(ctx.device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.compile:
        model = torch.compile(model)
    _, scheduled = step_budget(cfg, len(train_loader))
    engine = build_engine(model, tc, ctx.device, scheduled, ctx.distributed, log=say)
    weights = class_weights_from(train_ds, scheme.num_classes) \
        if tc.class_weights else None
    trainer = Trainer(cfg, engine, train_loader, val_loader, scheme, ctx, log=say,
                      checkpoint_path=out / "checkpoint.pt", class_weights=weights)
    if row_channels_last(cfg) != trainer.channels_last:  # rows must say what runs
        raise RuntimeError(f"segcore.registry's trains_nchw disagrees with engine "
                           f"{cfg.train.engine!r} about the memory format it trains in")
    if resume_state is not None:
        trainer.resume(resume_state)
    if ctx.is_primary:  # only now: the configuration used, after any checkpoint loaded
        dump_config(cfg, out / "config.toml")
    return _Setup(cfg, ctx, out, scheme, cond, index, train_loader, val_loader, engine,
                  trainer, flops, val_images=n_val)


def _fit(s: _Setup) -> tuple[TrainResult, dict[str, Any]]:
    """Trainer.fit() under the memory and power probes; (its result, the row's memory,
    conditions and wall-clock columns)."""
    from segcore.train import telemetry

    ctx = s.ctx
    baseline = telemetry.host_rss_mb()  # after imports, data and model build
    s.trainer.memory = telemetry.PhasePeaks(ctx.device, baseline)
    s.trainer.memory.enter("warmup")  # the peaks then cover training, not set-up
    nvml = telemetry.NvmlSampler(ctx.device.index or 0) if ctx.device.type == "cuda" \
        else None
    if nvml:
        nvml.start()
    energy = EnergyCounter(ctx.device)
    s.trainer.energy = energy
    t0 = time.perf_counter()
    res = s.trainer.fit()
    wall = time.perf_counter() - t0
    nvml_stats = nvml.stop() if nvml else {}
    loader = s.train_loader
    dali_mb = loader.memory_mb() if hasattr(loader, "memory_mb") else None
    memory = _gather_memory(ctx, nvml_stats, baseline, s.trainer.memory.result(), dali_mb)
    extra = {**memory, **s.conditions, "loader_workers": getattr(loader, "num_workers", None),
             "decode": s.cfg.data.decode,
             **loader_columns(s.cfg, ctx, loader, res.timing.get("throughput_img_s")),
             "dist_backend": ctx.backend, "wall_s": wall,
             "skipped_pairs": len(s.index.problems), "val_images": s.val_images,
             "data_source": "synthetic" if s.cfg.data.source == "synthetic"
             else str(s.index.root), **s.index.fingerprint(),
             "first_step_unix": res.first_step_unix,
             **_energy_columns(s, res, energy)}
    return res, extra


# Timed batches of the loader-only measurement, at least (else train.measure_steps).
MIN_LOADER_BATCHES = 10


def loader_columns(cfg: RunConfig, ctx: DistContext, loader: Any,
                   step_img_s: float | None) -> dict[str, Any]:
    """The training loader iterated alone, after training (no model), on the same workers.

    Each rank times ``max(measure_steps x grad_accum, MIN_LOADER_BATCHES)`` batches
    after draining what its workers had queued (``workers x prefetch + 1`` batches, one
    without workers); the rates are summed over ranks, as ``throughput_img_s`` sums the
    images of every rank.

    Returns:
        ``loader_img_s`` (img/s, all ranks), ``loader_img_s_per_worker`` (per loader
        worker process; the training process counts as one without workers),
        ``loader_batches`` and ``loader_s`` (per rank: what the figure rests on) and
        ``loader_step_ratio`` (``loader_img_s / step_img_s``: above 1 the loader could
        keep up with the step).
    """
    tc = cfg.train
    workers = int(getattr(loader, "num_workers", 0) or 0)
    warmup = workers * prefetch_factor(workers) + 1 if workers else 1
    batches = max(tc.measure_steps * tc.grad_accum, MIN_LOADER_BATCHES)
    mine = loader_throughput(loader, batches, warmup, ctx.device)
    total = all_reduce_sum(torch.tensor([mine["loader_img_s"] or 0.0],
                                        dtype=torch.float64))
    img_s = float(total[0]) if mine["loader_img_s"] else None
    return {"loader_img_s": img_s,
            "loader_img_s_per_worker": img_s / (ctx.world_size * max(1, workers))
            if img_s else None,
            "loader_batches": mine["loader_batches"], "loader_s": mine["loader_s"],
            "loader_step_ratio": img_s / step_img_s if img_s and step_img_s else None}


def _energy_columns(s: _Setup, res: TrainResult, energy: EnergyCounter) -> dict[str, Any]:
    """``energy_j_per_img`` over the timed window: every GPU's energy (a CPU package once
    per node: its counter covers the socket) over the window's images; else
    ``energy_why``, one word."""
    ctx, tc = s.ctx, s.cfg.train
    counted = res.energy_j is not None and (ctx.device.type == "cuda" or ctx.local_rank == 0)
    t = torch.tensor([res.energy_j if counted else 0.0, 1.0 if counted else 0.0,
                      1.0 if res.energy_j is None else 0.0], dtype=torch.float64)
    if ctx.distributed and ctx.backend == "gloo":
        all_reduce_sum(t)
    elif ctx.distributed:
        t = all_reduce_sum(t.to(ctx.device)).cpu()
    joules, counters, missing = t.tolist()
    images = res.energy_steps * (tc.global_batch_size or tc.per_worker_batch * ctx.world_size)
    if counters and not missing and images:
        return {"energy_j_per_img": joules / images, "energy_source": energy.source,
                "energy_why": None}
    why = energy.why or ("no-window" if s.cfg.mode == "accuracy" else "unreadable")
    return {"energy_j_per_img": None, "energy_source": None, "energy_why": why}


def _write_stopped(s: _Setup, status: str, error: str, **extra: Any) -> None:
    """The row of a run that stopped before its end (``diverged``, ``interrupted``) in
    result.json, on the primary rank: its configuration, why, and ``extra``."""
    from segcore.io import write_json_atomic

    if not s.ctx.is_primary:
        return
    row: dict[str, Any] = {"sweep_id": s.cfg.sweep_id, "run_id": s.cfg.run_id,
                           "status": status, "error": error}
    row.update(config_columns(s.cfg, nnodes=s.ctx.nnodes, device_type=s.ctx.device.type,
                              device_name=device_name(s.ctx.device)))
    row.update(extra, epochs=len(s.trainer.history))
    try:
        write_json_atomic(s.out / "result.json", row)
    except OSError:
        pass  # the run's own error says more than a row we cannot write


def _write(s: _Setup, res: TrainResult, extra: dict[str, Any],
           say: Log) -> dict[str, Any] | None:
    """The row, metrics.json, result.json and the figures (primary rank; the others
    only join the final weights' gather)."""
    from segcore.io import write_json_atomic

    cfg, ctx, out, scheme = s.cfg, s.ctx, s.out, s.scheme
    row = build_row(cfg, ctx, res, s.flops, extra)
    # Collective under ZeRO-3: every rank.
    final_weights = res.final_weights or s.engine.model_state_dict()
    if not ctx.is_primary:
        return None
    write_json_atomic(out / "metrics.json", {"best": res.metrics, "history": res.history,
                                             "timing": res.timing,
                                             "step_losses": res.step_losses})
    write_json_atomic(out / "result.json", row)
    try:
        from segcore.train import figures
        plain = build_model(cfg.model, scheme.num_classes, binary=scheme.is_binary)
        plain.load_state_dict(final_weights)
        figures.run_figures(out, res, scheme, plain.to(ctx.device),
                            s.val_loader.on("cpu"), ctx.device, cfg.model.channels_last)
    except Exception as e:  # figures must not lose the results already written
        say(f"warning: figures not drawn ({type(e).__name__}: {e})")
    say(summary_line(row))
    return row


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def summary_line(row: dict[str, Any]) -> str:
    from segcore.fmt import fmt

    return (f"done: {fmt(row.get('throughput_img_s'), '.1f')} img/s (95 % CI "
            f"+/-{fmt(row.get('throughput_ci95_pct'), '.1f')} %, "
            f"{row.get('measured_steps')} measured steps), step p50 "
            f"{fmt(row.get('step_ms_p50'), '.0f')} ms, data wait "
            f"{fmt(row.get('data_wait_pct'), '.1f')} %, memory "
            f"{fmt(row.get('mem_workload_mb'), '.0f')} MiB above baseline, mIoU "
            f"{fmt(row.get('mIoU'), '.3f')}, train {fmt(row.get('train_time_s'), '.0f')} s")
