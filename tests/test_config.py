import pytest

from segcore.config import (ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig,
                            dump_config, load_config, widths_for_depth)


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
    (lambda: TrainConfig(batch_size=0), r"train.batch_size = 0 must be"),
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
