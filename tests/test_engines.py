"""Engine construction details, synchronized BatchNorm, and DeepSpeed's op notice and
checkpoint state. Multi-rank cases use tests/test_trainer.py's gloo harness."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from segcore.config import ConfigError, ModelConfig, TrainConfig
from segcore.model import build_model
from segcore.train.engines import build_engine
from segcore.train.engines.base import Engine, make_optimizer
from segcore.train.engines.deepspeed import make_ds_config, merge
from segcore.train.engines.sync_bn import SyncBatchNorm2d, convert_sync_batchnorm
from test_trainer import on_ranks


def test_ds_config_from_run_config_and_user_json_merged_on_top(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"wall_clock_breakdown": True,
                                "flops_profiler": {"enabled": True, "profile_step": 5},
                                "zero_optimization": {"overlap_comm": True}}))
    cfg = TrainConfig(engine="deepspeed", zero_stage=3, local_batch_size=4, grad_accum=2,
                      precision="bf16", deepspeed_config=str(user))
    ds = make_ds_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 4 * 2 * 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 0.0  # same optimisation as single/DDP
    # nested keys merge: the stage survives next to the user's overlap_comm
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["overlap_comm"] is True
    assert ds["wall_clock_breakdown"] is True and ds["flops_profiler"]["profile_step"] == 5


def test_ds_fp16_uses_dynamic_loss_scaling():
    ds = make_ds_config(TrainConfig(engine="deepspeed", precision="fp16"), 1)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0


def test_bad_user_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        make_ds_config(TrainConfig(engine="deepspeed", deepspeed_config=str(bad)), 1)
    with pytest.raises(ConfigError, match="does not exist"):
        make_ds_config(TrainConfig(engine="deepspeed",
                                   deepspeed_config=str(tmp_path / "nope.json")), 1)


def test_merge_is_recursive_and_does_not_mutate():
    a = {"x": {"y": 1, "z": 2}, "w": 1}
    assert merge(a, {"x": {"y": 5}}) == {"x": {"y": 5, "z": 2}, "w": 1}
    assert a["x"]["y"] == 1


@pytest.mark.parametrize("name,klass", [("adam", torch.optim.Adam),
                                        ("adamw", torch.optim.AdamW),
                                        ("sgd", torch.optim.SGD)])
def test_optimizers(name, klass):
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer(p, TrainConfig(optimizer=name), torch.device("cpu")),
                      klass)


def test_fp16_policy_scales_the_loss_and_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    eng = Engine(model, TrainConfig(precision="fp16", schedule="none"), torch.device("cpu"),
                 10)
    assert eng.scaler.is_enabled()
    before = model.weight.detach().clone()
    start_scale = eng.scaler.get_scale()
    # A step whose scaled gradients overflow is skipped and the scale shrinks (dynamic
    # loss scaling); within a few steps the scale fits and the weights move.
    for _ in range(30):
        loss = eng.forward(torch.randn(3, 4)).float().pow(2).mean()
        eng.backward(loss)
        eng.step()
        assert all(p.grad is None for p in model.parameters())  # zeroed after each step
    assert not torch.equal(before, model.weight)
    assert eng.scaler.get_scale() <= start_scale


# --------------------------------------------------------------------------- --sync-bn


def _bn_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g) * 3 + 1  # a large mean: the two-pass case
    upstream = torch.randn(4, 3, 5, 5, generator=g)
    return x, upstream


def _bn_init(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 1.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn


def _sync_bn_half(rank, world):
    x, upstream = _bn_inputs()
    bn = _bn_init(SyncBatchNorm2d(3))
    part = slice(2 * rank, 2 * rank + 2)
    xr = x[part].clone().requires_grad_()
    y = bn(xr)
    (y * upstream[part]).sum().backward()
    return {"y": y.detach(), "dx": xr.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "mean": bn.running_mean, "var": bn.running_var}


@pytest.mark.multiproc
def test_sync_batchnorm_on_two_ranks_equals_batchnorm_over_the_whole_batch(tmp_path):
    ranks = on_ranks(_sync_bn_half, tmp_path)
    x, upstream = _bn_inputs()
    bn = _bn_init(nn.BatchNorm2d(3))
    x = x.clone().requires_grad_()
    y = bn(x)
    (y * upstream).sum().backward()
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), **close)
    # each rank's input gradient includes its images' effect on the shared statistics
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), x.grad, **close)
    # parameter gradients are per-rank shares that DDP sums (then averages)
    torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], bn.weight.grad, **close)
    torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], bn.bias.grad, **close)
    for r in ranks:  # running statistics of the global batch (unbiased variance)
        torch.testing.assert_close(r["mean"], bn.running_mean, **close)
        torch.testing.assert_close(r["var"], bn.running_var, **close)


def test_convert_keeps_parameters_buffers_and_keys():
    model = build_model(ModelConfig(widths=(8, 16), norm="batch", channels_last=False), 6)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    means = [id(m.running_mean) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    out = convert_sync_batchnorm(model, torch.device("cpu"))
    assert out is model
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(type(m) is SyncBatchNorm2d for m in bns)
    assert list(model.state_dict()) == keys  # checkpoints load into a plain model
    assert [id(p) for p in model.parameters()] == params  # an optimizer built before holds them
    assert [id(m.running_mean) for m in bns] == means
    x = torch.randn(2, 3, 32, 32)
    plain = build_model(ModelConfig(widths=(8, 16), norm="batch", channels_last=False), 6)
    plain.load_state_dict(model.state_dict())
    # no process group: plain BatchNorm, in training and in eval mode
    torch.testing.assert_close(model(x), plain(x))
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x))


def test_sync_bn_needs_workers_and_batchnorm():
    cpu = torch.device("cpu")
    bn_model = build_model(ModelConfig(widths=(8, 16), norm="batch"), 6)
    with pytest.raises(ConfigError, match="--engine ddp or deepspeed"):
        build_engine(bn_model, TrainConfig(sync_bn=True), cpu, 10, False)
    gn_model = build_model(ModelConfig(widths=(8, 16), norm="group"), 6)
    with pytest.raises(ConfigError, match="no BatchNorm"):
        build_engine(gn_model, TrainConfig(engine="ddp", sync_bn=True), cpu, 10, True)


# --------------------------------------------------------------------------- DeepSpeed


@pytest.fixture
def deepspeed_cpu():
    from segcore.train.engines.deepspeed import SHM_OP, import_deepspeed
    ds = import_deepspeed(torch.device("cpu"))
    if not ds.ops.__compatible_ops__.get(SHM_OP):
        pytest.skip("DeepSpeed's CPU communication op cannot be built here")
    return ds


def test_shm_op_needs_building_only_until_it_is_built(deepspeed_cpu, tmp_path, monkeypatch):
    from segcore.train.engines.deepspeed import SHM_OP, shm_op_to_build
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = shm_op_to_build(deepspeed_cpu)
    assert folder is not None and folder.name == SHM_OP and tmp_path in folder.parents
    (folder / f"{SHM_OP}.so").write_bytes(b"")  # what a finished build leaves
    assert shm_op_to_build(deepspeed_cpu) is None


def _engine_notices(rank, world):
    from segcore.train.engines import deepspeed as dse
    dse.shm_op_to_build = lambda _ds: Path("/cache/deepspeed_shm_comm")  # as on a new machine
    said = []
    model = build_model(ModelConfig(widths=(8, 16), norm="group"), 6)
    dse.DeepSpeedEngine(model, TrainConfig(engine="deepspeed"), torch.device("cpu"), 5,
                        log=said.append)
    return said


@pytest.mark.multiproc
def test_deepspeed_says_once_what_it_compiles_and_how_long_it_took(deepspeed_cpu, tmp_path):
    said = on_ranks(_engine_notices, tmp_path, world=1)[0]
    assert len(said) == 2
    assert "compiling its CPU communication op" in said[0] and "once per machine" in said[0]
    assert "~2 minutes" in said[0] and "/cache/deepspeed_shm_comm" in said[0]
    assert said[1].startswith("DeepSpeed: communication op ready (")


def _zero_checkpoint(rank, world, out, stage, precision):
    from segcore.train.checkpoint import load_checkpoint, save_checkpoint
    from segcore.train.engines.deepspeed import DeepSpeedEngine

    def engine(seed, weights=None):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(widths=(8, 16), norm="group", channels_last=False), 6)
        if weights is not None:
            model.load_state_dict(weights)
        return DeepSpeedEngine(model, TrainConfig(engine="deepspeed", zero_stage=stage,
                                                  precision=precision), torch.device("cpu"),
                               10)

    def steps(eng, n):
        g = torch.Generator().manual_seed(rank)
        for _ in range(n):
            loss = eng.forward(torch.randn(2, 3, 32, 32, generator=g)).float().square().mean()
            eng.backward(loss)
            eng.step()
        return float(loss)

    a = engine(0)
    steps(a, 2)
    state = a.state_dict()  # a collective: every rank
    if rank == 0:
        save_checkpoint({"engine": state, "config": {}}, Path(out) / "ds.pt")
    torch.distributed.barrier()
    loaded = load_checkpoint(Path(out) / "ds.pt")  # weights_only: plain data only
    b = engine(1)
    b.load_state_dict(loaded["engine"])
    # Weights only (an older checkpoint): a fresh optimizer, but on the loaded weights;
    # the same as an engine built on them (the fp32 masters follow the weights).
    weights = loaded["engine"]["model"]
    c, d = engine(1), engine(1, weights)
    c.load_state_dict({"model": weights})
    return {"a": steps(a, 2), "b": steps(b, 2), "lr_a": a.lr, "lr_b": b.lr,
            "c": steps(c, 2), "d": steps(d, 2),
            "shards": len(loaded["engine"]["optimizer_shards"])}


@pytest.mark.multiproc
@pytest.mark.parametrize("stage,precision", [pytest.param(0, "fp32", marks=pytest.mark.slow),
                                             (1, "bf16"), (3, "fp32")])
def test_deepspeed_checkpoint_restores_optimizer_and_schedule(deepspeed_cpu, tmp_path,
                                                              stage, precision):
    ranks = on_ranks(_zero_checkpoint, tmp_path, str(tmp_path), stage, precision)
    for r in ranks:
        # the restored engine continues exactly as the original (moments, masters, lr)
        assert r["b"] == pytest.approx(r["a"], rel=1e-6, abs=1e-7)
        assert r["lr_b"] == r["lr_a"]
        assert r["c"] == pytest.approx(r["d"], rel=1e-6, abs=1e-7)
        assert r["c"] != pytest.approx(r["a"], rel=1e-4)  # fresh moments: another path
    assert ranks[0]["shards"] == (1 if stage == 0 else 2)


def test_a_rebuild_of_deepspeeds_op_is_announced_when_it_starts(tmp_path):
    """The op left by another environment is rebuilt without any sign but the builder's
    lock file: the watch says so as the build starts, once."""
    import threading
    import time

    from segcore.train.engines.deepspeed import build_watch

    said: list[str] = []
    with build_watch(tmp_path, said.append, poll_s=0.05):
        time.sleep(0.2)
        assert said == []  # nothing built: nothing said
        (tmp_path / "lock").touch()  # torch.utils.cpp_extension starts compiling
        deadline = time.time() + 5
        while not said and time.time() < deadline:
            time.sleep(0.05)
    assert len(said) == 1 and "compiling its CPU communication op" in said[0]
    assert str(tmp_path) in said[0]
    said.clear()
    with build_watch(tmp_path, said.append, said=True, poll_s=0.05):  # announced already
        time.sleep(0.2)
    assert said == [] and threading.active_count() >= 1
