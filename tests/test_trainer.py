"""The Trainer in-process: validation on 2 ranks with uneven shards, early stopping,
resume, gradient accumulation, and each loss against an independent computation.

Multi-rank cases run the real Trainer and engines in ``torch.multiprocessing`` workers
joined by a gloo group (no torchrun, no CLI), on 32 px tensors and a 2-level U-Net.
Every worker's collective timeout is short, so a hang fails the test instead of
stalling it.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from segcore.config import ModelConfig, RunConfig, TrainConfig
from segcore.data.classes import IGNORE_INDEX, scheme as make_scheme
from segcore.data.dataset import ShardSampler
from segcore.dist import DistContext, free_port
from segcore.model import build_model
from segcore.train.engines import build_engine
from segcore.train.losses import segmentation_loss
from segcore.train.trainer import Trainer

N_TRAIN, N_VAL, SIDE = 16, 5, 32  # 5 validation images: 2 ranks at batch 2 hold 2 and 1
TIMEOUT_S = 40  # a rank left waiting fails the worker (and the test) after this


# --------------------------------------------------------------------------- harness


def tensors(n: int, seed: int, binary: bool = False, ignore: float = 0.05):
    """Images whose first channel decides the class (learnable), with a share of
    ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIDE, SIDE, generator=g)
    classes = 2 if binary else 6
    y = ((x[:, 0].clamp(-1.5, 1.5) + 1.5) / 3 * classes).long().clamp(max=classes - 1)
    y[torch.rand(n, SIDE, SIDE, generator=g) < ignore] = IGNORE_INDEX
    return x, y


def run_config(engine="single", zero=0, epochs=1, batch=2, accum=1, patience=0,
               monitor="mIoU", lr=0.05, norm="group", loss="ce", sync_bn=False,
               optimizer="sgd") -> RunConfig:
    return RunConfig(
        model=ModelConfig(arch="modern", widths=(8, 16), norm=norm, channels_last=False),
        train=TrainConfig(local_batch_size=batch, epochs=epochs, engine=engine,
                          zero_stage=zero, optimizer=optimizer, lr=lr, lr_scaling="none",
                          warmup_steps=0, patience=patience, monitor=monitor,
                          grad_accum=accum, loss=loss, sync_bn=sync_bn),
        mode="accuracy")


def make_trainer(cfg: RunConfig, rank: int = 0, world: int = 1, binary: bool = False,
                 checkpoint: Path | None = None, seed: int = 0,
                 ignore: float = 0.05) -> Trainer:
    """The real Trainer over in-memory data, sharded as the run shards it: the training
    split by DistributedSampler, the validation split by ShardSampler (no padding).
    ``ignore=0`` gives every batch the same pixel count, so a mean loss over two halves
    equals the mean over the whole."""
    scheme = make_scheme("binary" if binary else "six")
    ctx = DistContext(rank, rank, world, world, 1, torch.device("cpu"),
                      "gloo" if world > 1 else None)
    torch.manual_seed(seed)
    model = build_model(cfg.model, scheme.num_classes, binary=scheme.is_binary)
    train_ds = TensorDataset(*tensors(N_TRAIN, 1, binary, ignore))
    val_ds = TensorDataset(*tensors(N_VAL, 2, binary))
    b = cfg.train.local_batch_size
    train = DataLoader(train_ds, batch_size=b, drop_last=True, sampler=DistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True))
    val = DataLoader(val_ds, batch_size=b, sampler=ShardSampler(N_VAL, rank, world))
    steps = cfg.train.epochs * (len(train) // cfg.train.grad_accum)
    engine = build_engine(model, cfg.train, ctx.device, steps, world > 1)
    return Trainer(cfg, engine, train, val, scheme, ctx, checkpoint_path=checkpoint)


def _worker(rank, world, port, out, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        torch.save(fn(rank, world, *args), Path(out) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()
    # Done and saved: leave without interpreter shutdown, where DeepSpeed's CPU op has
    # been seen to abort in a C++ destructor ("terminate called without an active
    # exception") in about half of the workers spawned by a parent that imported it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def on_ranks(fn, tmp_path: Path, *args, world: int = 2) -> list:
    """``fn(rank, world, *args)`` on ``world`` gloo workers; every rank's return value."""
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path), fn, args), nprocs=world,
             join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def reference_confusion(weights: dict, cfg: RunConfig, binary: bool = False) -> torch.Tensor:
    """The whole validation split through a plain model in one process, counted with
    numpy (independent of segcore.metrics and of the Trainer)."""
    scheme = make_scheme("binary" if binary else "six")
    model = build_model(cfg.model, scheme.num_classes, binary=scheme.is_binary)
    model.load_state_dict(weights)
    model.eval()
    x, y = tensors(N_VAL, 2, binary)
    with torch.no_grad():
        logits = model(x)
    pred = (logits[:, 0] > 0).long() if binary else logits.argmax(1)
    n = scheme.num_classes
    cm = np.zeros((n, n), np.int64)
    keep = (y != IGNORE_INDEX).numpy()
    np.add.at(cm, (y.numpy()[keep], pred.numpy()[keep]), 1)
    return torch.from_numpy(cm)


# --------------------------------------------------------------------------- validation


def _validate_fresh_and_trained(rank, world, engine, zero):
    cfg = run_config(engine, zero, epochs=1)
    trainer = make_trainer(cfg, rank, world)
    # a copy: single and DDP hand out the live tensors, which training then changes
    fresh_w = {k: v.clone() for k, v in trainer.engine.model_state_dict().items()}
    _, fresh = trainer.validate()  # a fresh engine: ZeRO-3 still records its module order
    trainer.fit()
    _, trained = trainer.validate()
    return {"fresh": fresh, "trained": trained, "fresh_w": fresh_w,
            "trained_w": trainer.engine.model_state_dict(),
            "n_val_batches": len(trainer.val_loader)}


ENGINES = [("ddp", 0), ("fsdp", 0), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2),
           ("deepspeed", 3)]


@pytest.mark.multiproc
# ZeRO 0-2 forwards are local like DDP's; ZeRO-3 and FSDP (collective forwards) run in CI.
@pytest.mark.parametrize("engine,zero", [
    pytest.param(e, z, id=f"{e}{z if e == 'deepspeed' else ''}",
                 marks=[pytest.mark.slow] if e == "deepspeed" and z < 3 else [])
    for e, z in ENGINES])
def test_validation_on_two_ranks_with_uneven_shards_equals_one_process(tmp_path, engine,
                                                                        zero):
    ranks = on_ranks(_validate_fresh_and_trained, tmp_path, engine, zero)
    assert [r["n_val_batches"] for r in ranks] == [2, 1]  # uneven: the hang's condition
    cfg = run_config(engine, zero)
    for when in ("fresh", "trained"):
        want = reference_confusion(ranks[0][f"{when}_w"], cfg)
        assert int(want.sum()) > 0.9 * N_VAL * SIDE * SIDE  # every image counted once
        for r in ranks:
            assert torch.equal(r[when], want), (when, r[when], want)


def test_single_process_validation_counts_every_image_once():
    cfg = run_config()
    trainer = make_trainer(cfg)
    metrics, cm = trainer.validate()
    assert torch.equal(cm, reference_confusion(trainer.engine.model_state_dict(), cfg))
    x, y = tensors(N_VAL, 2)
    with torch.no_grad():
        logits = trainer.engine.module.eval()(x)
    want = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX).item()
    assert metrics["val_loss"] == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- early stopping


def _early_stop(rank, world, engine, zero):
    # lr 1e-9: predictions never change, so mIoU never improves after the first epoch.
    cfg = run_config(engine, zero, epochs=6, patience=2, lr=1e-9)
    res = make_trainer(cfg, rank, world).fit()
    return {"epochs": res.epochs, "stopped": res.stopped_early}


@pytest.mark.multiproc
@pytest.mark.parametrize("engine,zero", [("ddp", 0), ("deepspeed", 3)])
def test_early_stopping_stops_every_rank_at_the_same_epoch(tmp_path, engine, zero):
    ranks = on_ranks(_early_stop, tmp_path, engine, zero)
    # epoch 1 sets the best; epochs 2 and 3 do not improve: patience 2 is spent.
    assert ranks == [{"epochs": 3, "stopped": True}] * 2


# --------------------------------------------------------------------------- resume


def _train_and_resume(rank, world, out, engine, zero):
    from segcore.train.checkpoint import load_checkpoint

    def cfg():
        return run_config(engine, zero, epochs=2, optimizer="adamw", lr=3e-3)

    out = Path(out)
    full = make_trainer(cfg(), rank, world, checkpoint=out / "full" / "ckpt.pt").fit()
    # The same run cut after epoch 1 (its schedule still planned for 2 epochs) ...
    cut = make_trainer(cfg(), rank, world, checkpoint=out / "cut" / "ckpt.pt")
    cut.cfg.train.epochs = 1
    cut.fit()
    tdist.barrier()  # last.pt is written by rank 0
    # ... and resumed in a fresh trainer (other initial weights) from its last.pt.
    resumed = make_trainer(cfg(), rank, world, checkpoint=out / "cut" / "ckpt.pt", seed=123)
    resumed.resume(load_checkpoint(out / "cut" / "last.pt"))
    res = resumed.fit()
    return {"full": full.step_losses, "resumed": res.step_losses,
            "history": [h["epoch"] for h in res.history]}


@pytest.mark.multiproc
@pytest.mark.parametrize("engine,zero", [("ddp", 0), ("deepspeed", 2)])
def test_resume_continues_the_same_trajectory(tmp_path, engine, zero):
    ranks = on_ranks(_train_and_resume, tmp_path, str(tmp_path), engine, zero)
    r = ranks[0]
    per_epoch = N_TRAIN // (2 * 2)
    assert len(r["full"]) == 2 * per_epoch and len(r["resumed"]) == per_epoch
    assert r["history"] == [1, 2]  # the resumed run carries epoch 1's history on
    # AdamW's moments and the cosine schedule come back with the weights: epoch 2 of the
    # resumed run is epoch 2 of the uninterrupted one (a fresh optimizer would differ).
    np.testing.assert_allclose(r["resumed"], r["full"][per_epoch:], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- accumulation


def test_gradient_accumulation_equals_the_larger_batch():
    big = make_trainer(run_config(batch=4, epochs=1), ignore=0)
    accum = make_trainer(run_config(batch=2, accum=2, epochs=1), ignore=0)
    a, b = big.fit(), accum.fit()
    assert a.steps == b.steps == N_TRAIN // 4
    # per optimizer step: the big batch's loss == the mean of its two halves' losses
    halves = torch.tensor(b.step_losses).view(-1, 2).mean(1)
    np.testing.assert_allclose(halves.numpy(), a.step_losses, rtol=1e-5, atol=1e-6)
    for (k, p), q in zip(big.engine.module.state_dict().items(),
                         accum.engine.module.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)


def _ddp_accumulation(rank, world):
    t = make_trainer(run_config("ddp", batch=2, accum=2, epochs=1), rank, world, ignore=0)
    t.fit()
    return t.engine.module.state_dict()


@pytest.mark.multiproc
def test_ddp_accumulation_on_two_ranks_equals_one_process_at_four_times_the_batch(
        tmp_path):
    ranks = on_ranks(_ddp_accumulation, tmp_path)
    # 2 ranks x batch 2 x 2 micro-batches = 8 images per step; one process, batch 8.
    one = make_trainer(run_config(batch=8, epochs=1), ignore=0)
    one.fit()
    for k, v in one.engine.module.state_dict().items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(ranks[1][k], v, rtol=1e-5, atol=1e-6, msg=k)


# --------------------------------------------------------------------------- losses


def ref_ce(logits: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    """Per-pixel softmax cross-entropy by explicit loops; weighted mean as torch defines
    it (sum of w[y] * nll over the sum of w[y]); ignored pixels left out."""
    num = den = 0.0
    n, c, h, wd = logits.shape
    for i in range(n):
        for r in range(h):
            for col in range(wd):
                t = y[i, r, col]
                if t == IGNORE_INDEX:
                    continue
                z = logits[i, :, r, col].astype(np.float64)
                lse = z.max() + math.log(np.exp(z - z.max()).sum())
                wt = 1.0 if w is None else float(w[t])
                num += wt * (lse - z[t])
                den += wt
    return num / den


def ref_dice(probs: np.ndarray, y: np.ndarray, eps: float = 1.0) -> float:
    """1 - mean over classes of (2 |P.T| + eps) / (|P| + |T| + eps), valid pixels only."""
    valid = y != IGNORE_INDEX
    scores = []
    for k in range(probs.shape[1]):
        p = probs[:, k][valid].astype(np.float64)
        t = (y[valid] == k).astype(np.float64)
        scores.append((2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps))
    return 1 - float(np.mean(scores))


def loss_inputs(c: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, c, 5, 6, generator=g) * 2
    y = torch.randint(0, max(c, 2), (2, 5, 6), generator=g)
    y[0, 0, :3] = IGNORE_INDEX
    return logits, y


def test_cross_entropy_against_explicit_loops():
    logits, y = loss_inputs(4)
    got = segmentation_loss(logits, y, binary=False)
    assert got.item() == pytest.approx(ref_ce(logits.numpy(), y.numpy()), rel=1e-6)
    total = segmentation_loss(logits, y, binary=False, reduction="sum")
    n_valid = int((y != IGNORE_INDEX).sum())
    assert total.item() == pytest.approx(got.item() * n_valid, rel=1e-6)


def test_class_weighted_cross_entropy_against_explicit_loops():
    logits, y = loss_inputs(4)
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    got = segmentation_loss(logits, y, binary=False, class_weights=w)
    assert got.item() == pytest.approx(ref_ce(logits.numpy(), y.numpy(), w.numpy()),
                                       rel=1e-6)
    assert got.item() != pytest.approx(ref_ce(logits.numpy(), y.numpy()), rel=1e-3)


def test_ce_plus_dice_against_explicit_loops():
    logits, y = loss_inputs(4)
    got = segmentation_loss(logits, y, binary=False, dice=True)
    probs = torch.softmax(logits.double(), 1).numpy()
    want = ref_ce(logits.numpy(), y.numpy()) + ref_dice(probs, y.numpy())
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_binary_bce_and_dice_against_explicit_formulas():
    logits, y = loss_inputs(1)  # one sigmoid logit; labels 0/1
    z, t = logits[:, 0].double().numpy(), y.numpy()
    valid = t != IGNORE_INDEX
    p = 1 / (1 + np.exp(-z))
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    want_bce = bce[valid].mean()
    got = segmentation_loss(logits, y, binary=True)
    assert got.item() == pytest.approx(want_bce, rel=1e-6)
    w = torch.tensor([1.0, 4.0])  # positives weigh 4x: a weighted *sum* over the pixel count
    wt = np.where(t == 1, 4.0, 1.0)
    got_w = segmentation_loss(logits, y, binary=True, class_weights=w)
    assert got_w.item() == pytest.approx((wt * bce)[valid].sum() / valid.sum(), rel=1e-6)
    probs = np.stack([1 - p, p], axis=1)
    got_d = segmentation_loss(logits, y, binary=True, dice=True)
    assert got_d.item() == pytest.approx(want_bce + ref_dice(probs, t), rel=1e-6)
