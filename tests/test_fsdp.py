"""FSDP2 engine: same training as DDP on 2 gloo workers, full-weight checkpoints, resume,
local evaluation with uneven batches, mixed precision."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segcore.config import ModelConfig, TrainConfig
from segcore.dist import free_port
from segcore.model import build_model
from segcore.train.engines.fsdp import mixed_precision_policies, shard_units

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- no group


def test_shard_units_are_the_unet_blocks_in_forward_order():
    model = build_model(ModelConfig(widths=(8, 16, 32)), 6)
    units = shard_units(model)
    assert units == [model.down[0], model.down[1], model.down[2], model.up[0], model.dec[0],
                     model.up[1], model.dec[1]]
    covered = {id(p) for u in units for p in u.parameters()}
    rest = [n for n, p in model.named_parameters() if id(p) not in covered]
    assert rest == ["head.weight", "head.bias"]  # the root unit's own


def test_mixed_precision_policies():
    block, norm, root = mixed_precision_policies("bf16")
    assert block.param_dtype == torch.bfloat16 and block.reduce_dtype == torch.float32
    assert norm.param_dtype == torch.float32  # BatchNorm statistics stay fp32
    assert root.output_dtype == torch.float32  # the loss sees fp32 logits
    assert mixed_precision_policies("fp32")[0].param_dtype is None


def test_fsdp_without_a_process_group_is_a_clear_error():
    from segcore.train.engines import build_engine

    model = build_model(ModelConfig(widths=(8, 16)), 6)
    with pytest.raises(RuntimeError, match="needs a process group"):
        build_engine(model, TrainConfig(engine="fsdp"), torch.device("cpu"), 10, False)


# --------------------------------------------------------------------------- 2 workers


def _batches(rank: int, steps: int):
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(2, 3, 32, 32, generator=g)
        yield x.contiguous(memory_format=torch.channels_last), torch.randint(0, 6, (2, 32, 32),
                                                                             generator=g)


def _new_engine(engine: str, precision: str, steps: int):
    from segcore.train.engines import build_engine

    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=(8, 16), norm="batch", channels_last=True), 6)
    cfg = TrainConfig(engine=engine, optimizer="sgd", lr=0.05, schedule="none",
                      precision=precision)
    return build_engine(model, cfg, torch.device("cpu"), steps, True)


def _train_steps(eng, batches, world):
    import torch.distributed as dist

    out = []
    for x, y in batches:
        loss = F.cross_entropy(eng.forward(x).float(), y)
        eng.backward(loss)
        eng.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        out.append(mean.item() / world)
    return out


def _worker(rank: int, world: int, port: int, engine: str, precision: str, steps: int,
            out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        batches = list(_batches(rank, steps))
        eng = _new_engine(engine, precision, steps)
        losses = _train_steps(eng, batches, world)
        # Uneven evaluation: rank 0 runs two local forwards, rank 1 one; a collective
        # inside a forward would hang here.
        common = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        with eng.evaluation() as fwd:
            evals = [fwd(batches[0][0]).float().sum().item() for _ in range(1 + (rank == 0))]
            same = fwd(common).float().sum().reshape(1)
        every = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(every, same)  # one model on every rank: rank 0's BatchNorm statistics
        weights = eng.model_state_dict()
        result = {"losses": losses, "eval": evals[0], "eval_ranks": [t.item() for t in every]}
        if engine == "fsdp":
            # Resume: half the steps, checkpoint, a fresh engine loads it, the rest.
            half = steps // 2
            first = _new_engine(engine, precision, steps)
            _train_steps(first, batches[:half], world)
            state = first.state_dict()
            second = _new_engine(engine, precision, steps)
            second.load_state_dict(state)
            result["resumed"] = _train_steps(second, batches[half:], world)
        if rank == 0:
            torch.save(weights, os.path.join(out, "weights.pt"))
            Path(out, "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    # Done and saved: leave without interpreter shutdown, where a gloo worker now and then
    # aborts in a C++ destructor (as launch/train.py does).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run(engine: str, tmp_path: Path, precision: str = "fp32", steps: int = 4):
    import torch.multiprocessing as mp

    out = tmp_path / f"{engine}-{precision}"
    out.mkdir()
    mp.start_processes(_worker, nprocs=2, start_method="spawn", join=True,
                       args=(2, free_port(), engine, precision, steps, str(out)))
    return (json.loads((out / "result.json").read_text()),
            torch.load(out / "weights.pt", weights_only=True))


@pytest.mark.multiproc
@pytest.mark.slow  # CI runs the same equivalence through launch/train.py
def test_fsdp_trajectory_equals_ddp_on_two_gloo_workers(tmp_path):
    ddp, ddp_w = _run("ddp", tmp_path)
    fsdp, fsdp_w = _run("fsdp", tmp_path)
    a, b = ddp["losses"], fsdp["losses"]
    assert len(a) == len(b) == 4 and a[0] != a[-1]  # it trains
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=1e-5, abs=1e-6)
    # Full, unsharded weights under the plain model's names: load into a bare model.
    assert set(fsdp_w) == set(ddp_w)
    for k in ddp_w:
        assert fsdp_w[k].shape == ddp_w[k].shape
        torch.testing.assert_close(fsdp_w[k].float(), ddp_w[k].float(), rtol=1e-4, atol=1e-5)
    build_model(ModelConfig(widths=(8, 16), norm="batch"), 6).load_state_dict(fsdp_w)
    # Rank 0's BatchNorm statistics in evaluation, as under DDP, on every rank.
    assert fsdp["eval"] == pytest.approx(ddp["eval"], rel=1e-4)
    a0, a1 = fsdp["eval_ranks"]
    assert a1 == a0  # same weights, same statistics, same input: the same numbers
    # Checkpoint (full weights + full optimizer state) -> fresh engine -> same steps.
    for x, y in zip(fsdp["resumed"], b[2:]):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)


@pytest.mark.multiproc
@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_tracks_ddp_autocast(tmp_path):
    ddp, _ = _run("ddp", tmp_path, "bf16", steps=3)
    fsdp, weights = _run("fsdp", tmp_path, "bf16", steps=3)
    for x, y in zip(ddp["losses"], fsdp["losses"]):
        assert y == pytest.approx(x, rel=2e-2)  # bf16 rounding differs, not the math
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())


@pytest.mark.multiproc
def test_fsdp_through_train_py_matches_ddp(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["SEGBENCH_CACHE"] = str(tmp_path / "cache")
    common = ["--image-size", "32", "--widths", "8,16", "--norm", "group",
              "--synthetic-images", "24", "--mode", "throughput", "--warmup-steps", "0",
              "--lr", "0.05", "--optimizer", "sgd", "--batch-size", "2", "--steps", "4",
              "--measure-steps", "0"]
    losses = {}
    for engine in ("ddp", "fsdp"):
        out = tmp_path / engine
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               f"--master-port={free_port()}", str(ROOT / "launch" / "train.py"), *common,
               "--engine", engine, "--out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        losses[engine] = json.loads((out / "metrics.json").read_text())["step_losses"]
        row = json.loads((out / "result.json").read_text())
        assert row["engine"] == engine and row["world_size"] == 2
    assert len(losses["fsdp"]) == len(losses["ddp"]) >= 4
    for x, y in zip(losses["ddp"], losses["fsdp"]):
        assert y == pytest.approx(x, rel=1e-4, abs=1e-5)
