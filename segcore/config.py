"""Typed run configuration: one dataclass per component, composed into :class:`RunConfig`.

Every field is validated on construction; a bad value raises :class:`ConfigError` naming
the field, the value and what is allowed. A resolved configuration is written beside
every result (``config.toml``) and can be loaded back with :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ARCHS = ("paper", "modern")
NORMS = ("batch", "group", "none")
SCHEMES = ("binary", "six", "full")
LOADERS = ("torch", "dali", "synthetic")
PRECISIONS = ("fp32", "bf16", "fp16")
ENGINES = ("single", "ddp", "deepspeed")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine")
LOSSES = ("ce", "ce+dice")
MONITORS = ("val_loss", "mIoU")
MODES = ("throughput", "accuracy", "both")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name} = {value!r} is not valid; "
                          f"choose one of: {', '.join(map(str, allowed))}")


def _positive(section: str, name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{name} = {value!r} must be a number {bound}")


def widths_for_depth(depth: int, base: int = 16) -> tuple[int, ...]:
    """Channel widths of a U-Net of ``depth`` levels doubling from ``base``: 3 -> (16, 32, 64)."""
    if not isinstance(depth, int) or depth < 2 or depth > 8:
        raise ConfigError(f"model.depth = {depth!r} must be an integer from 2 to 8")
    return tuple(base * 2 ** i for i in range(depth))


@dataclass
class ModelConfig:
    """U-Net family member.

    Attributes:
        arch: ``paper`` (the reference study: unpadded 2x2 convolutions, ReLU, center-crop
            skips, final interpolation) or ``modern`` (3x3 same-padding convolutions with
            normalization; output size equals input size).
        widths: channels per level, encoder top to bottleneck, e.g. ``(16, 32, 64)``.
        kernel: convolution kernel size (2 for ``paper``, 3 for ``modern`` by default).
        norm: ``batch``, ``group`` or ``none`` (``modern`` only; ``paper`` has none).
        channels_last: keep activations in NHWC memory format end to end.
        compile: wrap the model in ``torch.compile``.
    """

    arch: str = "modern"
    widths: tuple[int, ...] = (16, 32, 64, 128)
    kernel: int = 0  # 0 = the architecture's default
    norm: str = "batch"
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        _choice("model", "arch", self.arch, ARCHS)
        _choice("model", "norm", self.norm, NORMS)
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) < 2 or any(w <= 0 for w in self.widths):
            raise ConfigError(f"model.widths = {self.widths} needs at least 2 positive "
                              "widths, e.g. 16,32,64")
        if self.kernel == 0:
            self.kernel = 2 if self.arch == "paper" else 3
        if self.arch == "modern" and self.kernel % 2 == 0:
            raise ConfigError(f"model.kernel = {self.kernel}: the modern U-Net needs an odd "
                              "kernel (same padding); use 3 or 5, or --arch paper")
        _positive("model", "kernel", self.kernel)
        if self.norm == "group" and any(w % 8 for w in self.widths):
            raise ConfigError(f"model.norm = 'group' uses 8 groups; widths {self.widths} "
                              "must all be multiples of 8")

    @property
    def depth(self) -> int:
        return len(self.widths)


@dataclass
class DataConfig:
    """Where images come from and how they are cut.

    Attributes:
        source: ``synthetic`` (the built-in generated scenes) or a dataset folder.
        class_scheme: ``binary``, ``six`` or ``full``.
        image_size: side of the square training crop, in pixels.
        loader: ``torch`` (DataLoader), ``dali`` or ``synthetic`` (random tensors already on
            the device, for compute-only timing).
        augment: random crop + horizontal/vertical flips on training images.
        test_fraction: held-out share of the images (deterministic per ``split_seed``).
        synthetic_images / synthetic_height / synthetic_width: size of the built-in set.
        num_workers: torch DataLoader worker processes per training process.
        strict: fail on any bad image/mask pair instead of skipping it with a warning.
    """

    source: str = "synthetic"
    class_scheme: str = "six"
    image_size: int = 128
    loader: str = "torch"
    augment: bool = True
    test_fraction: float = 0.15
    split_seed: int = 0
    synthetic_images: int = 80
    synthetic_height: int = 256
    synthetic_width: int = 384
    num_workers: int = 0
    strict: bool = False

    def __post_init__(self) -> None:
        _choice("data", "class_scheme", self.class_scheme, SCHEMES)
        _choice("data", "loader", self.loader, LOADERS)
        _positive("data", "image_size", self.image_size)
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction = {self.test_fraction!r} must be "
                              "between 0 and 1 (exclusive), e.g. 0.15")
        for name in ("synthetic_images", "synthetic_height", "synthetic_width"):
            _positive("data", name, getattr(self, name))
        if self.synthetic_images < 2:
            raise ConfigError("data.synthetic_images must be at least 2 (train + test)")
        _positive("data", "num_workers", self.num_workers, allow_zero=True)


@dataclass
class TrainConfig:
    """Optimisation, precision, engine and stopping rules.

    Attributes:
        batch_size: images per worker per step.
        epochs: maximum epochs (accuracy mode).
        steps: if set, stop after this many optimizer steps (throughput mode); epochs then
            only bounds the data order.
        warmup_steps: steps excluded from timing statistics.
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + loss scaling).
        engine: ``single`` (no wrapper), ``ddp`` or ``deepspeed``.
        zero_stage: DeepSpeed ZeRO stage 0-3.
        patience: early-stopping patience in epochs on ``monitor`` (0 = off).
        target_miou: record the training time at which validation mIoU first reaches it.
        strong_scaling: keep the global batch fixed (``batch_size`` is then global).
    """

    batch_size: int = 8
    epochs: int = 8
    steps: int | None = None
    warmup_steps: int = 3
    lr: float = 3e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    loss: str = "ce"
    class_weights: bool = False
    precision: str = "fp32"
    engine: str = "single"
    zero_stage: int = 0
    deepspeed_config: str | None = None
    grad_accum: int = 1
    patience: int = 0
    monitor: str = "mIoU"
    target_miou: float = 0.6
    val_every: int = 1
    seed: int = 0
    strong_scaling: bool = False
    threads: int = 0  # 0 = cores / local workers
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _positive("train", "batch_size", self.batch_size)
        _positive("train", "epochs", self.epochs)
        if self.steps is not None:
            _positive("train", "steps", self.steps)
        _positive("train", "warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("train", "lr", self.lr)
        _choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        _choice("train", "schedule", self.schedule, SCHEDULES)
        _choice("train", "loss", self.loss, LOSSES)
        _choice("train", "precision", self.precision, PRECISIONS)
        _choice("train", "engine", self.engine, ENGINES)
        _choice("train", "zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice("train", "monitor", self.monitor, MONITORS)
        _positive("train", "grad_accum", self.grad_accum)
        _positive("train", "patience", self.patience, allow_zero=True)
        _positive("train", "val_every", self.val_every)
        _positive("train", "threads", self.threads, allow_zero=True)
        _positive("train", "timeout_s", self.timeout_s)
        if self.engine != "deepspeed" and self.zero_stage != 0:
            raise ConfigError(f"train.zero_stage = {self.zero_stage} only applies to "
                              "--engine deepspeed")


@dataclass
class RunConfig:
    """One configuration of the benchmark: what the sweep varies and train.py runs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mode: str = "both"
    out: str = "runs/latest"
    run_id: str = ""
    sweep_id: str = ""

    def __post_init__(self) -> None:
        _choice("run", "mode", self.mode, MODES)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"]["widths"] = list(self.model.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        d = dict(d)
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
        kwargs: dict[str, Any] = {}
        for key, klass in sections.items():
            sec = dict(d.pop(key, {}) or {})
            known = {f.name for f in dataclasses.fields(klass)}
            unknown = set(sec) - known
            if unknown:
                raise ConfigError(f"unknown field(s) in [{key}]: {', '.join(sorted(unknown))}; "
                                  f"known: {', '.join(sorted(known))}")
            if key == "train" and sec.get("steps") == 0:
                sec["steps"] = None  # TOML has no null: 0 stands for "not set"
            if key == "train" and sec.get("deepspeed_config") == "":
                sec["deepspeed_config"] = None
            kwargs[key] = klass(**sec)
        known = {f.name for f in dataclasses.fields(cls)} - set(sections)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown top-level field(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs, **d)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved configuration as TOML (or JSON when the suffix is ``.json``)."""
    import tomli_w

    from segcore.io import write_text_atomic

    d = cfg.to_dict()
    path = Path(path)
    if path.suffix == ".json":
        write_text_atomic(path, json.dumps(d, indent=2))
        return
    # TOML has no null: write 0 / "" for unset optional fields (read back as None).
    if d["train"]["steps"] is None:
        d["train"]["steps"] = 0
    if d["train"]["deepspeed_config"] is None:
        d["train"]["deepspeed_config"] = ""
    write_text_atomic(path, tomli_w.dumps(d))


def load_config(path: str | Path) -> RunConfig:
    """Load a configuration written by :func:`dump_config` (TOML or JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix == ".json":
        d = json.loads(path.read_text())
    else:
        with path.open("rb") as f:
            d = tomllib.load(f)
    return RunConfig.from_dict(d)
