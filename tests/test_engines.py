"""Engine construction details that need no process group."""

import json

import pytest
import torch

from segcore.config import ConfigError, TrainConfig
from segcore.train.engines.base import Engine, make_optimizer
from segcore.train.engines.deepspeed import make_ds_config, merge


def test_ds_config_from_run_config_and_user_json_merged_on_top(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"wall_clock_breakdown": True,
                                "flops_profiler": {"enabled": True, "profile_step": 5},
                                "zero_optimization": {"overlap_comm": True}}))
    cfg = TrainConfig(engine="deepspeed", zero_stage=3, batch_size=4, grad_accum=2,
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
