"""Run one configuration end to end and produce its result row and artefacts.

``launch/train.py`` parses flags into a :class:`~segcore.config.RunConfig` and calls
:func:`run`; the sweep launches that script once per configuration under torchrun.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from segcore.config import ConfigError, RunConfig, dump_config
from segcore.data.classes import ClassScheme, scheme as make_scheme
from segcore.data.dataset import (SegDataset, SyntheticBatches, make_eval_loader,
                                  make_train_loader)
from segcore.data.layouts import DatasetIndex, discover
from segcore.dist import DistContext, gather_objects, init_distributed, teardown
from segcore.train.engines import build_engine
from segcore.model import build_model, check_input_size, count_params, valid_side_at_most
from segcore.train.trainer import Trainer, TrainResult
from segcore.train.checkpoint import load_checkpoint

Log = Callable[[str], None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group_env() -> None:
    """Let ``python launch/train.py --engine ddp`` run as a 1-process group (no torchrun)."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from segcore.host import cpu_model

    return cpu_model()


def resolve_dataset(cfg: RunConfig, ctx: DistContext, log: Log) -> DatasetIndex:
    """The dataset index; the synthetic set is generated once (by the primary rank)."""
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
    return discover(d.source, strict=d.strict)


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


def build_loaders(cfg: RunConfig, ctx: DistContext, scheme: ClassScheme, log: Log):
    """Train and validation loaders for the configured loader type."""
    d, tc = cfg.data, cfg.train
    index = resolve_dataset(cfg, ctx, log)
    train_s, val_s = index.split(d.test_fraction, d.split_seed)
    crop = (d.image_size, d.image_size)
    check_input_size(cfg.model, *crop)
    per_worker = tc.batch_size
    if tc.strong_scaling:
        if tc.batch_size % ctx.world_size:
            raise ConfigError(f"strong scaling: global batch {tc.batch_size} is not divisible "
                              f"by {ctx.world_size} workers")
        per_worker = tc.batch_size // ctx.world_size
    val_ds = SegDataset(index, val_s, scheme, _val_crop(index, val_s, cfg), train=False)
    val_loader = make_eval_loader(val_ds, per_worker, ctx.rank, ctx.world_size,
                                  num_workers=d.num_workers,
                                  pin_memory=ctx.device.type == "cuda")
    train_ds = SegDataset(index, train_s, scheme, crop, train=True, augment=d.augment,
                          seed=tc.seed)
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
    else:
        train_loader = make_train_loader(train_ds, per_worker, ctx.rank, ctx.world_size,
                                         seed=tc.seed, num_workers=d.num_workers,
                                         pin_memory=ctx.device.type == "cuda")
    return index, train_ds, train_loader, val_loader, per_worker, len(train_s), len(val_s)


def _gather_memory(ctx: DistContext, nvml: dict[str, Any]) -> dict[str, Any]:
    from segcore.train import telemetry

    alloc = telemetry.allocator_peak_mb(ctx.device)
    mine = {"alloc": alloc, "host_peak": telemetry.host_peak_rss_mb(), **nvml}
    rows = gather_objects(mine)

    def mx(key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return max(vals) if vals else None

    host = mx("host_peak")
    peak = mx("alloc")
    return {"peak_mem_mb": peak if peak is not None else host,
            "peak_mem_source": "allocator" if peak is not None else "host_peak_rss",
            "host_rss_mb": host, "device_mem_mb": mx("device_mem_mb"),
            "gpu_util_pct": mx("gpu_util_pct"), "power_w": mx("power_w")}


def build_row(cfg: RunConfig, ctx: DistContext, scheme: ClassScheme, res: TrainResult,
              params: int, flops_per_image: int | None, memory: dict[str, Any],
              per_worker: int) -> dict[str, Any]:
    """One row of the results schema (DESIGN.md section 4)."""
    from segcore.train import telemetry

    t = res.timing
    row: dict[str, Any] = {
        "sweep_id": cfg.sweep_id, "run_id": cfg.run_id, "status": "ok", "error": "",
        "engine": cfg.train.engine, "zero_stage": cfg.train.zero_stage,
        "loader": cfg.data.loader, "precision": cfg.train.precision,
        "channels_last": cfg.model.channels_last, "compile": cfg.model.compile,
        "world_size": ctx.world_size, "nnodes": ctx.nnodes,
        "device_type": ctx.device.type, "device_name": device_name(ctx.device),
        "batch_size": per_worker, "global_batch_size": per_worker * ctx.world_size,
        "arch": cfg.model.arch, "depth": cfg.model.depth,
        "widths": "-".join(map(str, cfg.model.widths)), "image_size": cfg.data.image_size,
        "class_scheme": scheme.name, "num_classes": scheme.num_classes, "params": params,
        "mode": cfg.mode, "strong_scaling": cfg.train.strong_scaling,
        "lr": cfg.train.lr, "optimizer": cfg.train.optimizer, "augment": cfg.data.augment,
        "threads_per_worker": torch.get_num_threads() if ctx.device.type == "cpu" else None,
        # TF32 changes fp32 numerics on Ampere and later: recorded with the row.
        "tf32": (ctx.device.type == "cuda" and cfg.train.precision == "fp32"
                 and torch.backends.cuda.matmul.allow_tf32),
    }
    for k in ("warmup_steps", "measured_steps", "throughput_img_s", "step_ms_p50",
              "step_ms_p90", "step_ms_p99", "step_ms_mean", "step_ms_std", "data_wait_pct",
              "fwd_bwd_ms_p50", "optim_ms_p50"):
        row[k] = t.get(k)
    row["speedup"] = None  # filled by the sweep against the 1-worker row
    row["scaling_efficiency"] = None
    row["tflops"] = row["mfu"] = None
    if flops_per_image and t.get("throughput_img_s") and t["throughput_img_s"] == t["throughput_img_s"]:
        peak, source = telemetry.device_peak_tflops(ctx.device, _dtype(cfg))
        achieved, frac = telemetry.mfu(t["throughput_img_s"], flops_per_image, peak,
                                       n_devices=ctx.world_size)
        row.update(tflops=achieved, mfu=frac, peak_tflops=peak * ctx.world_size,
                   peak_tflops_source=source, train_gflops_per_image=flops_per_image / 1e9)
    row.update(memory)
    m = res.metrics or {}
    row.update(epochs=res.epochs, steps=res.steps, train_time_s=res.train_time_s,
               time_to_target_s=res.time_to_target_s, target_miou=cfg.train.target_miou,
               stopped_early=res.stopped_early, val_loss=m.get("val_loss"),
               aAcc=m.get("aAcc"), mIoU=m.get("mIoU"), mDice=m.get("mDice"),
               mAcc=m.get("mAcc"))
    for name in scheme.names:
        row[f"IoU.{name}"] = m.get(f"IoU.{name}")
    return row


def _dtype(cfg: RunConfig) -> torch.dtype:
    from segcore.precision import DTYPES
    return DTYPES[cfg.train.precision]


def run(cfg: RunConfig, log: Log = print, resume: bool = False) -> dict[str, Any] | None:
    """Train and evaluate one configuration; the primary rank writes ``cfg.out``.

    Returns:
        The result row on the primary rank, ``None`` on the others.
    """
    from segcore.train import telemetry
    from segcore.io import write_json_atomic

    started_at = _utc_now()
    if cfg.train.engine in ("ddp", "deepspeed"):
        ensure_process_group_env()
    ctx = init_distributed(cfg.train.timeout_s, cfg.train.threads)
    try:
        say: Log = log if ctx.is_primary else (lambda _m: None)
        out = Path(cfg.out)
        if ctx.is_primary:
            out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, out / "config.toml")
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        if ctx.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        where = (f"{ctx.world_size} CPU worker process(es) x {torch.get_num_threads()} "
                 "thread(s) — CPU timings show code paths and relative effects, not GPU "
                 "performance" if ctx.device.type == "cpu"
                 else f"{ctx.world_size} x {device_name(ctx.device)}")
        say(f"run {cfg.run_id or out.name}: {cfg.model.arch} U-Net widths "
            f"{list(cfg.model.widths)}, {cfg.data.class_scheme} classes, engine "
            f"{cfg.train.engine}, {cfg.train.precision}, on {where}")
        scheme = make_scheme(cfg.data.class_scheme)
        (index, train_ds, train_loader, val_loader, per_worker,
         n_train, n_val) = build_loaders(cfg, ctx, scheme, say)
        say(f"data: {n_train} train / {n_val} validation images, crop "
            f"{cfg.data.image_size}, loader {cfg.data.loader}, batch {per_worker}/worker")
        model = build_model(cfg.model, scheme.num_classes, binary=scheme.is_binary)
        params = count_params(model)
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
        steps_per_epoch = len(train_loader) // cfg.train.grad_accum
        total = cfg.train.steps or cfg.train.epochs * max(1, steps_per_epoch)
        engine = build_engine(model, cfg.train, ctx.device, total, ctx.distributed)
        weights = class_weights_from(train_ds, scheme.num_classes) \
            if cfg.train.class_weights else None
        if cfg.data.loader == "synthetic" and cfg.mode != "throughput":
            say("loader 'synthetic' feeds random tensors: accuracy is not measured "
                "(mode set to throughput)")
            cfg.mode = "throughput"
        trainer = Trainer(cfg, engine, train_loader, val_loader, scheme, ctx, log=say,
                          checkpoint_path=out / "checkpoint.pt", class_weights=weights)
        if resume:
            last = next((p for p in (out / "last.pt", out / "checkpoint.pt") if p.is_file()),
                        None)
            if last is None:
                raise FileNotFoundError(f"--resume: no last.pt or checkpoint.pt in {out}")
            trainer.resume(load_checkpoint(last))
        telemetry.reset_allocator_peak(ctx.device)
        telemetry.reset_host_peak_rss()  # the peak then covers training, not set-up
        nvml = telemetry.NvmlSampler(ctx.device.index or 0) if ctx.device.type == "cuda" \
            else None
        if nvml:
            nvml.start()
        t0 = time.perf_counter()
        res = trainer.fit()
        wall = time.perf_counter() - t0
        nvml_stats = nvml.stop() if nvml else {}
        memory = _gather_memory(ctx, nvml_stats)
        row = build_row(cfg, ctx, scheme, res, params, flops, memory, per_worker)
        row.update(wall_s=wall, first_step_unix=res.first_step_unix, started_at=started_at,
                   finished_at=_utc_now())
        final_weights = engine.model_state_dict()  # collective under ZeRO-3: every rank
        if not ctx.is_primary:
            return None
        write_json_atomic(out / "metrics.json", {"best": res.metrics, "history": res.history,
                                                 "timing": res.timing,
                                                 "step_losses": res.step_losses})
        write_json_atomic(out / "result.json", row)
        try:
            from segcore.train import figures as viz
            plain = build_model(cfg.model, scheme.num_classes, binary=scheme.is_binary)
            plain.load_state_dict(final_weights)
            viz.run_figures(out, res, scheme, plain.to(ctx.device), val_loader, ctx.device,
                            cfg.model.channels_last)
        except Exception as e:  # figures must not lose the results already written
            say(f"warning: figures not drawn ({type(e).__name__}: {e})")
        say(summary_line(row))
        return row
    finally:
        teardown()


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def summary_line(row: dict[str, Any]) -> str:
    def f(v, fmt):
        return "-" if v is None or v != v else format(v, fmt)

    return (f"done: {f(row.get('throughput_img_s'), '.1f')} img/s, step p50 "
            f"{f(row.get('step_ms_p50'), '.0f')} ms, data wait "
            f"{f(row.get('data_wait_pct'), '.1f')} %, peak mem "
            f"{f(row.get('peak_mem_mb'), '.0f')} MB, mIoU {f(row.get('mIoU'), '.3f')}, "
            f"train {f(row.get('train_time_s'), '.0f')} s")
