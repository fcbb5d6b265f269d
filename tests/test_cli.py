"""The command line generated from the configuration: every field reachable, typed and
checked by its field; aliases over the same paths; generic sweep axes; configurations
resolved once in the driver and checked in the job; the engine and loader registry."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from segcore import cli, registry
from segcore.config import (SECTIONS, ConfigError, RunConfig, check_resolved, dump_config,
                            load_config, resolve)
from segcore.sweep.grid import SweepSpec, expand


def _parse(argv):
    p = argparse.ArgumentParser()
    cli.add_config_arguments(p)
    return cli.overrides(p.parse_args(argv))


def test_every_field_is_a_dotted_path_with_its_default_and_type():
    table = cli.fields()
    expected = {f"{s}.{f.name}" for s, cls in SECTIONS.items()
                for f in dataclasses.fields(cls) if f.name not in SECTIONS}
    assert set(table) == expected
    assert table["train.lr"].default == RunConfig().train.lr
    assert table["model.widths"].parse("8,16") == [8, 16]
    assert table["data.num_workers"].parse("none") is None
    assert table["model.channels_last"].parse("off") is False
    assert table["train.engine"].choices == registry.ENGINES
    with pytest.raises(ConfigError, match="train.lr = 'x': expected a number"):
        table["train.lr"].parse("x")
    with pytest.raises(ConfigError, match="choose one of: single, ddp"):
        table["train.engine"].parse("horovod")


def test_every_alias_names_a_field_and_set_wins_over_it():
    table = cli.fields()
    assert all(a.path in table for a in cli.ALIASES)
    over = _parse(["--lr", "0.01", "--batch-size", "4", "--set", "train.lr=0.02",
                   "--set", "train.weight_decay=0", "--depth", "3", "--no-augment"])
    assert over["train"] == {"lr": 0.02, "local_batch_size": 4, "weight_decay": 0.0}
    assert over["model"]["widths"] == [16, 32, 64] and over["data"]["augment"] is False
    strong = _parse(["--batch-size", "8", "--strong-scaling"])["train"]
    assert strong["global_batch_size"] == 8
    with pytest.raises(ConfigError, match="not a configuration field; did you mean"):
        _parse(["--set", "train.weight=1"])
    with pytest.raises(ConfigError, match="PATH=VALUE"):
        _parse(["--set", "train.lr"])


def test_help_shows_every_default(capsys):
    p = argparse.ArgumentParser()
    cli.add_config_arguments(p)
    text = p.format_help()
    assert "(default: 0.003)" in text and "[train.lr]" in text and "--help-config" in text
    listing = cli.help_config()
    for path, f in cli.fields().items():
        assert path in listing
    assert "train.weight_decay" in listing and "= 0.0001" in listing


def test_a_generic_axis_multiplies_the_grid_and_is_recorded(tmp_path):
    spec = SweepSpec(workers=[1, 2], batch_sizes=[4], depths=[2], engines=["ddp"],
                     loaders=["torch"], precisions=["fp32"], channels_last=[True],
                     axes={"train.weight_decay": ["0", "1e-4"]})
    jobs = expand(spec, "s", tmp_path)
    assert len(jobs) == 4 and len({j.run_id for j in jobs}) == 4
    wd = {j.run_id: j.config.train.weight_decay for j in jobs}
    assert sorted(set(wd.values())) == [0.0, 1e-4]
    assert all(j.run_id.endswith(("weightdecay0", "weightdecay0.0001")) for j in jobs)
    assert {tuple(j.axis_columns().items()) for j in jobs} == {
        (("axis.train.weight_decay", 0.0),), (("axis.train.weight_decay", 1e-4),)}
    with pytest.raises(ConfigError, match="not a configuration field"):
        expand(dataclasses.replace(spec, axes={"train.nope": ["1"]}))
    with pytest.raises(ConfigError, match="expected a number"):
        expand(dataclasses.replace(spec, axes={"train.lr": ["fast"]}))


def test_axis_columns_keep_families_apart():
    import pandas as pd

    from segcore.results import analysis

    df = pd.DataFrame([{"axis.train.weight_decay": 0.0}, {"axis.train.weight_decay": 1e-4}])
    assert "axis.train.weight_decay" in analysis.family_columns(df)


def test_the_driver_resolves_and_the_job_only_checks(tmp_path):
    cfg, _ = resolve(RunConfig.from_dict({"train": {"engine": "ddp"}}), 2)
    assert cfg.resolved
    check_resolved(cfg, 2)
    with pytest.raises(ConfigError, match="resolved for 2 worker"):
        check_resolved(cfg, 1)
    path = tmp_path / "c.toml"
    dump_config(cfg, path)
    edited = path.read_text().replace("local_batch_size = 8", "local_batch_size = 4")
    path.write_text(edited)
    with pytest.raises(ConfigError, match="edited after it was resolved"):
        check_resolved(load_config(path), 2)


def test_registry_is_the_one_list_of_engines_and_loaders():
    from segcore.columns import row_channels_last
    from segcore.scaling import memory, model

    assert registry.engine_axis_choices().split(", ") == [
        "single", "ddp", "deepspeed:0", "deepspeed:1", "deepspeed:2", "deepspeed:3", "fsdp"]
    for name, spec in registry.ENGINE_SPECS.items():
        for stage in spec.stages:
            assert registry.parse_engine_axis(spec.axis_value(stage)) == (name, stage)
            assert model.comm_pattern(name, stage) in registry.COMM_PATTERNS
            assert memory.engine_kind(name, stage) in registry.MEMORY_KINDS
        assert spec.load().__name__  # the implementation imports
        cfg = RunConfig.from_dict({"train": {"engine": name}})
        assert row_channels_last(cfg) is (not spec.trains_nchw)
    with pytest.raises(ConfigError, match="only deepspeed takes a ZeRO stage"):
        registry.parse_engine_axis("ddp:1")
    mode = resolve(RunConfig.from_dict({"data": {"loader": "synthetic"}}), 1)[0].mode
    assert mode == "throughput"  # the loader's entry says it measures no accuracy
