import pytest

from segcore.config import (ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig,
                            dump_config, load_config, resolve, widths_for_depth)


def test_defaults_validate_and_roundtrip_toml(tmp_path):
    cfg = RunConfig(model=ModelConfig(arch="paper", widths=(16, 32, 64)),
                    train=TrainConfig(steps=5, engine="deepspeed", zero_stage=2))
    dump_config(cfg, tmp_path / "c.toml")
    back = load_config(tmp_path / "c.toml")
    assert back == cfg
    assert back.model.kernel == 2 and back.train.steps == 5


def test_json_roundtrip(tmp_path):
    cfg = RunConfig()
    dump_config(cfg, tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("make,match", [
    (lambda: DataConfig(class_scheme="seven"), r"data.class_scheme = 'seven'.*binary, six, full"),
    (lambda: ModelConfig(arch="vit"), r"model.arch.*paper, modern"),
    (lambda: TrainConfig(precision="fp8"), r"train.precision.*fp32, bf16, fp16"),
    (lambda: TrainConfig(local_batch_size=0), r"train.local_batch_size = 0 must be"),
    (lambda: TrainConfig(local_batch_size=2.5), r"must be a whole number"),
    (lambda: TrainConfig(lr=float("nan")), r"train.lr = nan must be a finite number"),
    (lambda: TrainConfig(target_miou=2), r"from 0 to 1"),
    (lambda: TrainConfig(lr_scaling="cubic"), r"linear, sqrt, none"),
    (lambda: ModelConfig(widths="16,32"), r"list of whole numbers"),
    (lambda: TrainConfig(zero_stage=2), r"only applies to --engine deepspeed"),
    (lambda: ModelConfig(widths=(16,)), r"at least 2"),
    (lambda: ModelConfig(kernel=2), r"odd kernel"),
    (lambda: DataConfig(test_fraction=1.5), r"test_fraction"),
])
def test_bad_values_name_field_and_choices(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_unknown_field_in_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[model]\narch = "modern"\ncolour = "red"\n')
    with pytest.raises(ConfigError, match="unknown field.*colour"):
        load_config(p)


def test_widths_for_depth():
    assert widths_for_depth(3) == (16, 32, 64)
    with pytest.raises(ConfigError):
        widths_for_depth(1)


def test_resolve_fills_both_batches_and_is_idempotent():
    weak, notes = resolve(RunConfig(train=TrainConfig(engine="ddp", local_batch_size=4,
                                                      grad_accum=2)), 3)
    assert (weak.train.per_worker_batch, weak.train.global_batch_size) == (4, 24)
    assert resolve(weak, 3)[0] == weak and notes == []
    strong, _ = resolve(RunConfig(train=TrainConfig(engine="ddp", global_batch_size=16,
                                                    strong_scaling=True)), 4)
    assert (strong.train.per_worker_batch, strong.train.global_batch_size) == (4, 16)
    with pytest.raises(ConfigError, match="does not split over 3 worker"):
        resolve(RunConfig(train=TrainConfig(engine="ddp", global_batch_size=16,
                                            strong_scaling=True)), 3)
    synth, notes = resolve(RunConfig(data=DataConfig(loader="synthetic")), 1)
    assert synth.mode == "throughput" and "accuracy cannot be measured" in notes[0]


@pytest.mark.parametrize("rule,factor", [("linear", 4.0), ("sqrt", 2.0), ("none", 1.0)])
def test_lr_scales_with_the_global_batch(rule, factor):
    cfg, _ = resolve(RunConfig(train=TrainConfig(engine="ddp", lr=1e-3, lr_scaling=rule)), 4)
    assert cfg.train.effective_lr == pytest.approx(1e-3 * factor)


def test_written_config_is_the_resolved_one_without_sentinels(tmp_path):
    cfg, _ = resolve(RunConfig(model=ModelConfig(arch="paper"),
                               train=TrainConfig(engine="ddp")), 2)
    dump_config(cfg, tmp_path / "c.toml")
    text = (tmp_path / "c.toml").read_text()
    assert "kernel = 2" in text and 'norm = "none"' in text  # per-arch defaults applied
    assert "steps" not in text.replace("warmup_steps", "").replace("measure_steps", "")
    assert load_config(tmp_path / "c.toml") == cfg


def test_configs_written_before_local_global_batch_still_load(tmp_path):
    p = tmp_path / "old.toml"
    p.write_text('[model]\nkernel = 0\n[train]\nbatch_size = 8\nsteps = 0\n'
                 'deepspeed_config = ""\nthreads = 0\n')
    cfg = load_config(p)
    assert cfg.train.local_batch_size == 8 and cfg.train.steps is None
    assert cfg.model.kernel == 3 and cfg.train.threads is None


def test_syntax_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[model\n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(p)
