"""Trainer: steps, epochs, validation, early stopping, checkpoints, timing.

One code path for every engine: the Trainer calls the :class:`~segcore.train.engines.Engine`
interface only. Losses and metrics are reduced across ranks as sums, so a run on N
workers reports exactly what one process would on the same data.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from segcore.config import RunConfig
from segcore.data.classes import ClassScheme
from segcore.data.classes import IGNORE_INDEX
from segcore.dist import DistContext, all_reduce_sum
from segcore.train.checkpoint import save_checkpoint
from segcore.train.engines import Engine
from segcore.train.losses import segmentation_loss
from segcore.metrics import ConfusionMatrix
from segcore.train.telemetry import StepTimer, cuda_sync_fn


@dataclass
class TrainResult:
    """What a run produced (the primary rank writes it out)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # of the best epoch
    confusion: torch.Tensor | None = None
    step_losses: list[float] = field(default_factory=list)  # global mean loss per step
    first_step_unix: float | None = None  # wall clock at the first step (launch overhead)
    epochs: int = 0
    steps: int = 0
    train_time_s: float = 0.0
    time_to_target_s: float | None = None
    stopped_early: bool = False


def injected_fault() -> tuple[int, int] | None:
    """``SEGBENCH_FAULT=RANK:STEP`` makes that rank raise before that step: a drill for
    checking that a failing worker fails the whole job fast (see docs/ARCHITECTURE.md)."""
    spec = os.environ.get("SEGBENCH_FAULT")
    if not spec:
        return None
    try:
        rank, step = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"SEGBENCH_FAULT={spec!r}: expected RANK:STEP, e.g. 1:3") from None
    return rank, step


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Trainer:
    """Train and validate one configuration.

    Args:
        cfg: the run configuration.
        engine: model + optimizer wrapped for the chosen engine.
        train_loader: iterable of (image, mask) batches; its sampler (if any) has
            ``set_epoch``.
        val_loader: evaluation batches, each image on exactly one rank.
        scheme: the class scheme (names, binary or not).
        ctx: this process's distributed context.
        log: called with progress lines on the primary rank (``None``: silent).
        checkpoint_path: where the best epoch's checkpoint goes (primary only); the
            latest epoch's goes beside it as ``last.pt``.
        class_weights: optional per-class loss weights.
    """

    def __init__(self, cfg: RunConfig, engine: Engine, train_loader, val_loader,
                 scheme: ClassScheme, ctx: DistContext,
                 log: Callable[[str], None] | None = None,
                 checkpoint_path: str | Path | None = None,
                 class_weights: torch.Tensor | None = None) -> None:
        self.cfg, self.engine, self.ctx, self.scheme = cfg, engine, ctx, scheme
        self.train_loader, self.val_loader = train_loader, val_loader
        self.log = log if (log is not None and ctx.is_primary) else (lambda _msg: None)
        self.checkpoint_path = checkpoint_path
        self.class_weights = None if class_weights is None else class_weights.to(ctx.device)
        self.channels_last = cfg.model.channels_last
        self.start_epoch = 0
        self.best_score: float | None = None
        self.history: list[dict[str, Any]] = []
        self.train_time_s = 0.0
        self.time_to_target_s: float | None = None

    # -- helpers --------------------------------------------------------------------
    def _to_device(self, x: torch.Tensor, y: torch.Tensor):
        dev = self.ctx.device
        nb = dev.type == "cuda"
        x = x.to(dev, non_blocking=nb)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(dev, non_blocking=nb)

    def _loss(self, logits, y, reduction="mean"):
        return segmentation_loss(logits, y, self.scheme.is_binary, self.class_weights,
                                 dice=self.cfg.train.loss == "ce+dice", reduction=reduction)

    def _score(self, metrics: dict[str, Any]) -> float:
        """Higher is better."""
        if self.cfg.train.monitor == "val_loss":
            return -metrics["val_loss"]
        return metrics["mIoU"]

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by this Trainer."""
        self.engine.load_state_dict(state["engine"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_score = state.get("best_score")
        self.history = list(state.get("history", []))
        self.train_time_s = float(state.get("train_time_s", 0.0))
        self.log(f"resumed from epoch {state['epoch'] + 1}")

    # -- evaluation -----------------------------------------------------------------
    @torch.inference_mode()
    def validate(self) -> tuple[dict[str, Any], torch.Tensor]:
        """Metrics over the whole validation split (summed over ranks)."""
        n_out = self.scheme.num_classes
        cm = ConfusionMatrix(n_out, ignore_index=IGNORE_INDEX, device=self.ctx.device)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        with self.engine.evaluation() as forward:
            for x, y in self.val_loader:
                x, y = self._to_device(x, y)
                logits = forward(x)
                loss_sum[0] += self._loss(logits, y, reduction="sum").double()
                loss_sum[1] += (y != IGNORE_INDEX).sum()
                cm.update_from_logits(logits.float(), y)
        cm.all_reduce()
        all_reduce_sum(loss_sum)
        metrics = cm.compute(self.scheme.names)
        metrics["val_loss"] = float(loss_sum[0] / loss_sum[1].clamp(min=1))
        return metrics, cm.mat.cpu()

    # -- training -------------------------------------------------------------------
    def fit(self) -> TrainResult:
        tc = self.cfg.train
        timer = StepTimer(tc.warmup_steps, sync=cuda_sync_fn(self.ctx.device))
        result = TrainResult()
        steps_per_epoch = len(self.train_loader) // tc.grad_accum
        if steps_per_epoch == 0:
            raise ValueError(
                f"the training split gives no full batch: {len(self.train_loader)} "
                f"micro-batches per epoch with grad_accum {tc.grad_accum}; lower "
                "--batch-size or use more images")
        max_steps = tc.steps if tc.steps is not None else tc.epochs * steps_per_epoch
        epochs = tc.epochs if tc.steps is None else math.ceil(tc.steps / steps_per_epoch)
        do_val = self.cfg.mode != "throughput"
        step = self.start_epoch * steps_per_epoch
        patience_left = tc.patience
        best_metrics: dict[str, Any] = {}
        best_cm = None
        step_losses: list[torch.Tensor] = []  # kept on the device: no sync per step
        fault = injected_fault()
        t_start = time.perf_counter()
        self.engine.train(True)
        for epoch in range(self.start_epoch, epochs):
            for obj in (getattr(self.train_loader, "sampler", None), self.train_loader,
                        getattr(self.train_loader, "dataset", None)):
                if hasattr(obj, "set_epoch"):
                    obj.set_epoch(epoch)
            loss_acc = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
            t_epoch = time.perf_counter()
            it = iter(self.train_loader)
            for _ in range(steps_per_epoch):
                if step >= max_steps:
                    break
                if fault is not None and fault == (self.ctx.rank, step + 1):
                    raise RuntimeError(f"injected fault on rank {self.ctx.rank} at step "
                                       f"{step + 1} (SEGBENCH_FAULT)")
                if result.first_step_unix is None:
                    result.first_step_unix = time.time()
                timer.begin()
                n_img = 0
                for micro in range(tc.grad_accum):
                    x, y = next(it)
                    x, y = self._to_device(x, y)
                    if micro == 0:
                        timer.data_ready()
                    sync_later = micro < tc.grad_accum - 1
                    with self.engine.accumulate() if sync_later else contextlib.nullcontext():
                        logits = self.engine.forward(x)
                        loss = self._loss(logits, y)
                        self.engine.backward(loss)
                    loss_acc[0] += loss.detach().double()
                    loss_acc[1] += 1
                    step_losses.append(loss.detach().double())
                    n_img += x.shape[0]
                timer.compute_done()
                self.engine.step()
                timer.end(n_img * self.ctx.world_size)
                step += 1
            self.train_time_s += time.perf_counter() - t_epoch
            with timer.paused():  # epoch bookkeeping is not training time
                all_reduce_sum(loss_acc)
                train_loss = float(loss_acc[0] / loss_acc[1].clamp(min=1))
                row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": self.engine.lr,
                                       "train_loss": train_loss,
                                       "train_time_s": self.train_time_s}
                last = step >= max_steps or epoch == epochs - 1
                improved = False
                if do_val and ((epoch + 1) % tc.val_every == 0 or last):
                    metrics, cm = self.validate()
                    row.update({k: metrics[k]
                                for k in ("val_loss", "mIoU", "mDice", "mAcc", "aAcc")})
                    if self.time_to_target_s is None and metrics["mIoU"] >= tc.target_miou:
                        self.time_to_target_s = self.train_time_s
                    score = self._score(metrics)
                    if self.best_score is None or score > self.best_score:
                        self.best_score, best_metrics, best_cm = score, metrics, cm
                        patience_left, improved = tc.patience, True
                    else:
                        patience_left -= 1
                self.history.append(row)
                self._progress(row, epoch, epochs, step, max_steps, t_start)
                if self.checkpoint_path is not None:
                    self._save(epoch, best=improved or not do_val)
            if last:
                break
            if do_val and tc.patience and patience_left <= 0:
                self.log(f"early stop: {tc.monitor} has not improved for {tc.patience} "
                         f"validation(s)")
                result.stopped_early = True
                break
        if do_val and not best_metrics:
            best_metrics, best_cm = self.validate()
        if step_losses:
            per_step = all_reduce_sum(torch.stack(step_losses)) / self.ctx.world_size
            result.step_losses = per_step.cpu().tolist()
        result.history, result.timing = self.history, timer.summary()
        result.metrics, result.confusion = best_metrics, best_cm
        result.epochs, result.steps = len(self.history), step
        result.train_time_s, result.time_to_target_s = self.train_time_s, self.time_to_target_s
        return result

    def _progress(self, row, epoch, epochs, step, max_steps, t_start) -> None:
        elapsed = time.perf_counter() - t_start
        done = max(1e-9, (epoch + 1 - self.start_epoch) / max(1, epochs - self.start_epoch))
        eta = elapsed / done - elapsed
        parts = [f"epoch {epoch + 1}/{epochs}", f"step {step}/{max_steps}",
                 f"loss {row['train_loss']:.4f}"]
        if "mIoU" in row:
            parts += [f"val_loss {row['val_loss']:.4f}", f"mIoU {row['mIoU']:.3f}",
                      f"aAcc {row['aAcc']:.3f}"]
        parts += [f"lr {row['lr']:.2e}", f"elapsed {_fmt_s(elapsed)}", f"eta {_fmt_s(eta)}"]
        self.log("  ".join(parts))

    def _save(self, epoch: int, best: bool) -> None:
        """``last.pt`` every epoch (what ``--resume`` continues from) and
        ``checkpoint.pt`` when the epoch is the best so far (what prediction uses)."""
        # Every rank takes part (ZeRO-3 gathers shards); only the primary writes.
        state = {"engine": self.engine.state_dict(), "epoch": epoch,
                 "best_score": self.best_score, "history": self.history,
                 "train_time_s": self.train_time_s, "config": self.cfg.to_dict(),
                 "class_names": list(self.scheme.names)}
        if self.ctx.is_primary:
            path = Path(self.checkpoint_path)
            save_checkpoint(state, path.with_name("last.pt"))
            if best:
                save_checkpoint(state, path)
