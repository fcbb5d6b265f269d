"""Trainer: steps, epochs, validation, early stopping, checkpoints, timing.

One code path for every engine: the Trainer calls the :class:`~segcore.train.engines.Engine`
interface only. Losses and metrics are reduced across ranks as sums, so a run on N
workers reports exactly what one process would on the same data.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as tdist

from segcore.config import RunConfig
from segcore.data.classes import ClassScheme
from segcore.data.classes import IGNORE_INDEX
from segcore.dist import DistContext, all_reduce_sum
from segcore.train.checkpoint import save_checkpoint
from segcore.train.engines import Engine
from segcore.train.losses import segmentation_loss
from segcore.metrics import ConfusionMatrix, ProbHistogram
from segcore.train.telemetry import PhasePeaks, StepTimer, step_timer


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
    # Model weights at the end of the accuracy budget (mode both: before the window).
    final_weights: dict[str, Any] | None = None
    # Energy of this rank's device over the timed window's measured steps (warm-up
    # excluded), and those steps; None: no counter (see segcore.train.energy).
    energy_j: float | None = None
    energy_steps: int = 0


FAULT_KINDS = ("error", "oom", "kill")


@dataclass(frozen=True)
class Fault:
    """An injected fault (``SEGBENCH_FAULT=RANK:STEP[:KIND]``)."""

    rank: int
    step: int
    kind: str = "error"

    def fire(self, device: torch.device) -> None:
        """Raise (or die) as the real fault would."""
        where = f"on rank {self.rank} at step {self.step} (SEGBENCH_FAULT)"
        if self.kind == "kill":  # what the kernel's OOM killer does
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "oom":
            if device.type == "cuda":
                raise torch.OutOfMemoryError(f"CUDA out of memory: injected {where}")
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               f"allocate 1099511627776 bytes: injected {where}")
        raise RuntimeError(f"injected fault {where}")


def injected_fault() -> Fault | None:
    """``SEGBENCH_FAULT=RANK:STEP[:KIND]`` makes that rank fail before that step: a drill
    for checking that a failing worker fails the whole job fast and becomes the right row
    (see docs/ARCHITECTURE.md). KIND: ``error`` (default), ``oom`` (the allocator's
    out-of-memory error) or ``kill`` (SIGKILL, as the kernel's OOM killer)."""
    spec = os.environ.get("SEGBENCH_FAULT")
    if not spec:
        return None
    parts = spec.split(":")
    try:
        rank, step = int(parts[0]), int(parts[1])
        kind = parts[2] if len(parts) > 2 else "error"
    except (ValueError, IndexError):
        raise ValueError(f"SEGBENCH_FAULT={spec!r}: expected RANK:STEP[:KIND], e.g. 1:3 or "
                         "1:3:oom") from None
    if len(parts) > 3 or kind not in FAULT_KINDS:
        raise ValueError(f"SEGBENCH_FAULT={spec!r}: KIND must be one of "
                         f"{', '.join(FAULT_KINDS)}")
    return Fault(rank, step, kind)


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def step_budget(cfg: RunConfig, micro_batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps the run trains): ``train.steps`` if
    set, else the throughput window (mode ``throughput``) or ``epochs`` whole epochs. The
    one rule for the Trainer's loop and the engine's lr schedule (mode ``both`` times its
    window after the budget, on the schedule's last lr)."""
    tc = cfg.train
    per_epoch = micro_batches_per_epoch // tc.grad_accum
    if tc.steps:
        return per_epoch, tc.steps
    if cfg.mode == "throughput":
        return per_epoch, tc.warmup_steps + tc.measure_steps
    return per_epoch, tc.epochs * max(1, per_epoch)


# Steps between the checks for a non-finite loss while training the accuracy budget
# (each check is one host sync and one tiny all-reduce); a throughput window is checked
# at its end, so no sync enters the timed steps.
DIVERGENCE_CHECK_STEPS = 4


class Diverged(RuntimeError):
    """The training loss became NaN or infinite: the run stops with status ``diverged``.

    Attributes:
        step: the optimizer step by which it was seen.
        last_finite_loss: the last finite step loss before it (``None``: none was).
    """

    def __init__(self, step: int, last_finite_loss: float | None) -> None:
        self.step, self.last_finite_loss = step, last_finite_loss
        last = "none" if last_finite_loss is None else f"{last_finite_loss:.4g}"
        super().__init__(f"diverged: the training loss is not finite by step {step} (last "
                         f"finite loss {last}); lower --lr, or use --precision fp32 / a "
                         "loss scale; checkpoints of earlier epochs are kept, none of this "
                         "one is written")


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
        memory: per-phase memory peaks to keep (``warmup`` until the first timer's
            warm-up is done, then ``train``; ``val`` around validation).
    """

    def __init__(self, cfg: RunConfig, engine: Engine, train_loader, val_loader,
                 scheme: ClassScheme, ctx: DistContext,
                 log: Callable[[str], None] | None = None,
                 checkpoint_path: str | Path | None = None,
                 class_weights: torch.Tensor | None = None,
                 memory: PhasePeaks | None = None) -> None:
        self.cfg, self.engine, self.ctx, self.scheme = cfg, engine, ctx, scheme
        self.train_loader, self.val_loader = train_loader, val_loader
        self.log = log if (log is not None and ctx.is_primary) else (lambda _msg: None)
        self.checkpoint_path = checkpoint_path
        self.class_weights = None if class_weights is None else class_weights.to(ctx.device)
        # What runs, not only what was asked: an engine that keeps NCHW weights
        # (DeepSpeed) gets NCHW inputs, so no convolution converts layouts.
        self.channels_last = cfg.model.channels_last and getattr(engine, "channels_last", True)
        self.memory = memory
        self.start_epoch = 0
        self.best_score: float | None = None
        self.history: list[dict[str, Any]] = []
        self.train_time_s = 0.0
        self.time_to_target_s: float | None = None
        self._step_losses: list[torch.Tensor] = []
        self._unchecked: list[torch.Tensor] = []  # step losses since the last check
        self._last_finite: float | None = None
        self._step = 0
        self._fault = None  # set by fit() from SEGBENCH_FAULT
        self.energy = None  # a segcore.train.energy.EnergyCounter, set by the caller
        # (joules, step) when the timed window's measured steps began; (None, 0): armed
        self._energy_start: tuple[float | None, int] | None = None

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (in the current phase)."""
        return self._step

    # -- helpers --------------------------------------------------------------------
    def _to_device(self, x: torch.Tensor, y: torch.Tensor):
        dev = self.ctx.device
        nb = dev.type == "cuda"
        x = x.to(dev, non_blocking=nb)
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last
                         else torch.contiguous_format)
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
    # no_grad, not inference_mode: an engine may keep buffers it fills here (FSDP's
    # unsharded weights), and inference tensors could not be written by training later.
    @torch.no_grad()
    def validate(self) -> tuple[dict[str, Any], torch.Tensor]:
        """Metrics over the whole validation split (summed over ranks).

        Every rank runs the same number of forwards, whatever its shard: a rank with
        fewer batches (5 images on 2 ranks at batch 2: 2 and 1) runs padding forwards
        on one blank image and discards them. An engine's forward can be a collective
        (ZeRO-3 fetches each layer's weights and, while it records its module order,
        checks it against rank 0 with a broadcast), and a rank that moved on to the
        metric all-reduce would leave the other waiting until the collective timeout.
        """
        n_out = self.scheme.num_classes
        cm = ConfusionMatrix(n_out, ignore_index=IGNORE_INDEX, device=self.ctx.device)
        # Score histograms (fixed bins: summed exactly over batches and ranks) for
        # precision-recall and ROC curves, AP and AUC per class.
        hist = ProbHistogram(n_out, ignore_index=IGNORE_INDEX, device=self.ctx.device)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        batches = iter(self.val_loader)
        first = next(batches, None)
        n_pad, blank = self._eval_padding(first)
        with self.engine.evaluation() as forward:
            for x, y in itertools.chain([first] if first is not None else [], batches):
                x, y = self._to_device(x, y)
                logits = forward(x)
                loss_sum[0] += self._loss(logits, y, reduction="sum").double()
                loss_sum[1] += (y != IGNORE_INDEX).sum()
                cm.update(self.scheme.predict(logits.float()), y)
                scores = logits.float()
                hist.update(torch.sigmoid(scores) if self.scheme.is_binary
                            else scores.softmax(dim=1), y)
            for _ in range(n_pad):
                forward(blank)
        cm.all_reduce()
        hist.all_reduce()
        all_reduce_sum(loss_sum)
        metrics = cm.compute(self.scheme.names)
        metrics["val_loss"] = float(loss_sum[0] / loss_sum[1].clamp(min=1))
        curves = hist.summary(self.scheme.names)
        metrics.update(mAP=curves["mAP"], mAUC=curves["mAUC"], curves=curves)
        return metrics, cm.mat.cpu()

    def _eval_padding(self, first) -> tuple[int, torch.Tensor | None]:
        """How many padding forwards this rank owes, and the blank input for them.

        One collective before any forward: the most batches any rank holds, and the
        image shape (a rank with no batch at all learns it from the others; validation
        images share one size).
        """
        if not self.ctx.distributed:
            return 0, None
        mine = [len(self.val_loader), *(first[0].shape[1:] if first is not None else (0,) * 3)]
        most = torch.tensor(mine, dtype=torch.int64, device=self.ctx.device)
        tdist.all_reduce(most, op=tdist.ReduceOp.MAX)
        n_pad = int(most[0]) - mine[0]
        if n_pad == 0:
            return 0, None
        blank = torch.zeros(1, *most[1:].tolist(), device=self.ctx.device)
        if self.channels_last:
            blank = blank.contiguous(memory_format=torch.channels_last)
        return n_pad, blank

    # -- training -------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train per the mode: ``accuracy`` trains the budget (``steps``, else ``epochs``)
        with validation; ``throughput`` times a window of ``warmup_steps + measure_steps``
        steps (or ``steps``); ``both`` trains the budget, then times a separate window, so
        that every configuration's throughput rests on the same number of measured steps
        whatever its dataset size, epochs or worker count, and its accuracy on an equal
        sample budget."""
        tc, mode = self.cfg.train, self.cfg.mode
        self.steps_per_epoch, budget = step_budget(self.cfg, len(self.train_loader))
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training split gives no full batch: {len(self.train_loader)} "
                f"micro-batches per epoch with grad_accum {tc.grad_accum}; lower "
                "--batch-size or use more images")
        result = TrainResult()
        self._fault = injected_fault()
        self._epoch = self.start_epoch
        self._step = self.start_epoch * self.steps_per_epoch
        self.engine.train(True)
        if mode == "throughput":
            timer = step_timer(tc.warmup_steps, self.ctx.device)
            # A throughput run measures speed: checkpoints only when asked for
            # (--save-checkpoints), else their writes would sit inside its wall clock.
            self._timed_window(budget, timer, result, checkpoints=tc.save_checkpoints)
        else:
            timer = step_timer(tc.warmup_steps, self.ctx.device)
            self._train(budget, timer, result, accuracy=True, checkpoints=True)
            result.steps = self._step
            if mode == "both":
                # The trained weights are the run's result; the window only times steps.
                result.final_weights = self.engine.model_state_dict()  # collective (ZeRO-3)
                timer = step_timer(tc.warmup_steps, self.ctx.device)
                self._step = 0
                self.log(f"throughput window: {tc.warmup_steps} warm-up + "
                         f"{tc.measure_steps} measured steps")
                self._timed_window(tc.warmup_steps + tc.measure_steps, timer, result,
                                   checkpoints=False)
        if mode == "throughput":
            result.steps = self._step
        if self._step_losses:
            per_step = all_reduce_sum(torch.stack(self._step_losses)) / self.ctx.world_size
            result.step_losses = per_step.cpu().tolist()
        result.history, result.timing = self.history, timer.summary()
        result.epochs = len(self.history)
        result.train_time_s, result.time_to_target_s = self.train_time_s, self.time_to_target_s
        return result

    def _train(self, total_steps: int, timer: StepTimer, result: TrainResult,
               accuracy: bool, checkpoints: bool) -> None:
        """Train until ``self._step`` reaches ``total_steps``, epoch by epoch (the loader
        loops as often as needed). ``accuracy``: validate, early-stop and keep the losses
        and history of the budget; else only time steps (a throughput window)."""
        tc = self.cfg.train
        do_val = accuracy and self.cfg.mode != "throughput"
        patience_left = tc.patience
        epochs = math.ceil(total_steps / self.steps_per_epoch)
        t_start = time.perf_counter()
        while self._step < total_steps:
            epoch = self._epoch
            for obj in (getattr(self.train_loader, "sampler", None), self.train_loader,
                        getattr(self.train_loader, "dataset", None)):
                if hasattr(obj, "set_epoch"):
                    obj.set_epoch(epoch)
            loss_acc = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
            t_epoch = time.perf_counter()
            it = iter(self.train_loader)
            for _ in range(self.steps_per_epoch):
                if self._step >= total_steps:
                    break
                loss = self._one_step(it, timer, result)
                loss_acc[0] += loss.sum()
                loss_acc[1] += loss.numel()
                if accuracy or self.cfg.mode == "throughput":
                    self._step_losses.extend(loss.unbind())
                self._unchecked.append(loss)
                if accuracy and len(self._unchecked) >= DIVERGENCE_CHECK_STEPS:
                    with timer.paused():
                        self._check_finite()
            self._epoch += 1
            with timer.paused():
                self._check_finite()  # before anything of this epoch is saved
            last = self._step >= total_steps
            if not accuracy and self.cfg.mode != "throughput":
                continue  # the window after an accuracy budget: nothing to record
            self.train_time_s += time.perf_counter() - t_epoch
            with timer.paused():  # epoch bookkeeping is not training time
                all_reduce_sum(loss_acc)
                row: dict[str, Any] = {"epoch": epoch + 1, "step": self._step,
                                       "lr": self.engine.lr,
                                       "train_loss": float(loss_acc[0] / loss_acc[1].clamp(min=1)),
                                       "train_time_s": self.train_time_s}
                improved = False
                if do_val and ((epoch + 1) % tc.val_every == 0 or last):
                    metrics, cm = self._validate_phase()
                    row.update({k: metrics[k]
                                for k in ("val_loss", "mIoU", "mDice", "mAcc", "aAcc", "mAP")})
                    if self.time_to_target_s is None and metrics["mIoU"] >= tc.target_miou:
                        self.time_to_target_s = self.train_time_s
                    score = self._score(metrics)
                    if self.best_score is None or score > self.best_score:
                        self.best_score, result.metrics, result.confusion = score, metrics, cm
                        patience_left, improved = tc.patience, True
                    else:
                        patience_left -= 1
                self.history.append(row)
                self._progress(row, epoch, epochs, self._step, total_steps, t_start)
                if checkpoints and self.checkpoint_path is not None:
                    self._save(epoch, best=improved or not do_val)
            if do_val and tc.patience and patience_left <= 0 and not last:
                self.log(f"early stop: {tc.monitor} has not improved for {tc.patience} "
                         f"validation(s)")
                result.stopped_early = True
                break
        if do_val and not result.metrics:
            result.metrics, result.confusion = self._validate_phase()

    def _timed_window(self, total_steps: int, timer: StepTimer, result: TrainResult,
                      checkpoints: bool) -> None:
        """The throughput window, the device's energy read when warm-up ends (in
        :meth:`_one_step`) and at the window's end: the measured steps' energy."""
        self._energy_start = None if self.energy is None else (None, 0)
        self._train(total_steps, timer, result, accuracy=False, checkpoints=checkpoints)
        start, self._energy_start = self._energy_start, None
        if start is not None and start[0] is not None:
            self._sync()  # the window's work is done
            e1 = self.energy.read()
            if e1 is not None:
                result.energy_j, result.energy_steps = e1 - start[0], self._step - start[1]

    def _sync(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    def _check_finite(self) -> None:
        """Raise :class:`Diverged` on every rank if any rank's loss since the last check
        is not finite (one all-reduce: the ranks stop together, none waits in a
        collective)."""
        if not self._unchecked:
            return
        losses = torch.cat([t.reshape(-1) for t in self._unchecked])
        self._unchecked = []
        bad = (~torch.isfinite(losses)).sum().reshape(1).double()
        all_reduce_sum(bad)
        host = losses.cpu()
        if bad.item() == 0:
            self._last_finite = float(host[-1])
            return
        bad_here = (~torch.isfinite(host)).nonzero()
        # (Another rank's loss may be the bad one: then all of ours were finite.)
        before = host[:int(bad_here[0])] if len(bad_here) else host
        last = float(before[-1]) if len(before) else self._last_finite
        raise Diverged(self._step, last)

    def _validate_phase(self) -> tuple[dict[str, Any], torch.Tensor]:
        """:meth:`validate`, its memory peak kept apart from the training steps'."""
        with self.memory.during("val") if self.memory else contextlib.nullcontext():
            return self.validate()

    def _one_step(self, it, timer: StepTimer, result: TrainResult) -> torch.Tensor:
        """One optimizer step of ``grad_accum`` micro-batches; their losses (detached,
        on the device: no host sync per step)."""
        tc = self.cfg.train
        if self._fault is not None and (self._fault.rank, self._fault.step) == (
                self.ctx.rank, self._step + 1):
            self._fault.fire(self.ctx.device)
        if result.first_step_unix is None:
            result.first_step_unix = time.time()
        timer.begin()
        n_img = 0
        losses = []
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
            losses.append(loss.detach().double())
            n_img += x.shape[0]
        timer.compute_done()
        self.engine.step()
        timer.end(n_img * self.ctx.world_size)
        if self.memory is not None and self.memory.phase == "warmup" and not timer.in_warmup:
            self.memory.enter("train")  # from here on: the steady training step's peak
        if self._energy_start == (None, 0) and not timer.in_warmup:
            self._sync()  # warm-up (compilation included) stays out of the energy
            self._energy_start = (self.energy.read(), self._step + 1)
        self._step += 1
        return torch.stack(losses)

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
