"""Typed run configuration: one dataclass per component, composed into :class:`RunConfig`.

Every field is validated on construction; a bad value raises :class:`ConfigError` naming
the field, the value and what is allowed. A resolved configuration is written beside
every result (``config.toml``) and can be loaded back with :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ConfigError, ENGINES and LOADERS are read from here too; their homes are these modules.
from segcore.errors import ConfigError
from segcore.registry import DECODES, ENGINES, LOADERS, engine_spec, loader_spec

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ARCHS = ("paper", "modern")
NORMS = ("batch", "group", "none")
SCHEMES = ("binary", "six", "full", "unlabeled-binary", "map")  # map: data.class_map
PRED_THRESHOLDS = ("fixed", "median", "mean")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine")
LOSSES = ("ce", "ce+dice")
MONITORS = ("val_loss", "mIoU")
MODES = ("throughput", "accuracy", "both")
LR_SCALINGS = ("linear", "sqrt", "none")


# The allowed values of every field that has a fixed set: validation and both command
# lines read them here.
CHOICES: dict[str, tuple] = {
    "model.arch": ARCHS, "model.norm": NORMS,
    "data.class_scheme": SCHEMES, "data.loader": LOADERS, "data.decode": DECODES,
    "data.pred_threshold": PRED_THRESHOLDS,
    "train.lr_scaling": LR_SCALINGS, "train.optimizer": OPTIMIZERS,
    "train.schedule": SCHEDULES, "train.loss": LOSSES, "train.precision": PRECISIONS,
    "train.engine": ENGINES,
    "train.zero_stage": tuple(sorted({s for n in ENGINES for s in engine_spec(n).stages})),
    "train.monitor": MONITORS, "run.mode": MODES,
}


def _check_choices(section: str, obj: Any, skip: tuple[str, ...] = ()) -> None:
    for path, allowed in CHOICES.items():
        sec, _, name = path.partition(".")
        if sec == section and name not in skip:
            _choice(sec, name, getattr(obj, name), allowed)


def _choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name} = {value!r} is not valid; "
                          f"choose one of: {', '.join(map(str, allowed))}")


def _positive(section: str, name: str, value: Any, allow_zero: bool = False,
              integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) \
        and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        what = "a whole number" if integer else "a finite number"
        raise ConfigError(f"{section}.{name} = {value!r} must be {what} {bound}")


def _fraction(section: str, name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0.0 <= value <= 1.0):
        raise ConfigError(f"{section}.{name} = {value!r} must be a number from 0 to 1")


def _staged_engines() -> list[str]:
    return [n for n in ENGINES if engine_spec(n).staged]


def _group_engines() -> list[str]:
    return [n for n in ENGINES if not engine_spec(n).single_process]


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
        kernel: convolution kernel size (``None``: 2 for ``paper``, 3 for ``modern``;
            resolved on construction, so a written config holds the number).
        norm: ``batch``, ``group`` or ``none`` (``modern`` only; ``paper`` has no
            normalization, so its norm is always ``none``).
        channels_last: keep activations in NHWC memory format end to end.
        compile: wrap the model in ``torch.compile``.
    """

    arch: str = "modern"
    widths: tuple[int, ...] = (16, 32, 64, 128)
    kernel: int | None = None
    norm: str = "batch"
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        _check_choices("model", self)
        if isinstance(self.widths, (str, bytes)) or not all(
                isinstance(w, int) and not isinstance(w, bool) for w in self.widths):
            raise ConfigError(f"model.widths = {self.widths!r} must be a list of whole "
                              "numbers, e.g. [16, 32, 64]")
        self.widths = tuple(self.widths)
        if len(self.widths) < 2 or any(w <= 0 for w in self.widths):
            raise ConfigError(f"model.widths = {self.widths} needs at least 2 positive "
                              "widths, e.g. 16,32,64")
        if self.kernel is None or self.kernel == 0:
            self.kernel = 2 if self.arch == "paper" else 3
        if self.arch == "paper":
            self.norm = "none"  # the reference architecture has no normalization layers
        if self.arch == "modern" and self.kernel % 2 == 0:
            raise ConfigError(f"model.kernel = {self.kernel}: the modern U-Net needs an odd "
                              "kernel (same padding); use 3 or 5, or --arch paper")
        _positive("model", "kernel", self.kernel, integer=True)
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
        class_scheme: ``binary``, ``six``, ``full``, ``unlabeled-binary`` or ``map``
            (set by ``class_map``).
        image_size: side of the square training crop, in pixels.
        loader: ``torch`` (DataLoader), ``dali`` or ``synthetic`` (random tensors already on
            the device, for compute-only timing).
        decode: where the torch loader decodes the training JPEGs: ``cpu`` (PIL, in the
            worker processes) or ``gpu`` (nvJPEG on the CUDA device, batched; the workers
            only read the bytes and the masks). See docs/DATA.md.
        augment: random crop + horizontal/vertical flips on training images.
        test_fraction: held-out share of the images (deterministic per ``split_seed``).
        synthetic_images / synthetic_height / synthetic_width: size of the built-in set.
        num_workers: torch DataLoader worker processes per training process (``None``:
            on CUDA this process's share of the cores less one, at most 8; on CPU 0,
            as the training threads use every core).
        strict: fail on any bad image/mask pair instead of skipping it with a warning.
        class_map: a class-map TOML file (``configs/classmaps/``); sets ``class_scheme``
            to ``map``. Read and validated here, so a bad file fails at configuration.
        unlabeled_threshold: ``unlabeled-binary`` only: class 1 where the per-image
            standardized gray of the label image is above it (0.5: the study's code; 0:
            at the mean, its text). See :mod:`segcore.data.classes`.
        pred_threshold: binary schemes: ``fixed`` (p > 0.5), or the ``median``/``mean``
            of each output image (both classes get an equal share, as in the study).
    """

    source: str = "synthetic"
    class_scheme: str = "six"
    image_size: int = 128
    loader: str = "torch"
    decode: str = "cpu"
    augment: bool = True
    test_fraction: float = 0.15
    split_seed: int = 0
    synthetic_images: int = 80
    synthetic_height: int = 256
    synthetic_width: int = 384
    num_workers: int | None = None
    strict: bool = False
    class_map: str | None = None
    unlabeled_threshold: float = 0.5
    pred_threshold: str = "fixed"

    def __post_init__(self) -> None:
        self._check_classes()
        _positive("data", "image_size", self.image_size, integer=True)
        if not isinstance(self.test_fraction, (int, float)) or \
                not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction = {self.test_fraction!r} must be "
                              "between 0 and 1 (exclusive), e.g. 0.15")
        for name in ("synthetic_images", "synthetic_height", "synthetic_width"):
            _positive("data", name, getattr(self, name), integer=True)
        if self.synthetic_images < 2:
            raise ConfigError("data.synthetic_images must be at least 2 (train + test)")
        if self.num_workers is not None:
            _positive("data", "num_workers", self.num_workers, allow_zero=True, integer=True)
        takes = loader_spec(self.loader).decodes
        if self.decode not in takes:
            which = [n for n in LOADERS if self.decode in loader_spec(n).decodes]
            raise ConfigError(f"data.decode = {self.decode!r} applies to loader "
                              f"{' or '.join(repr(n) for n in which)} only, not "
                              f"{self.loader!r} (its decode is its own); leave --decode at "
                              f"{takes[0]} with --loader {self.loader}")

    def _check_classes(self) -> None:
        from segcore.data.classes import (BINARY_SCHEMES, DEFAULT_UNLABELED_THRESHOLD,
                                          ClassMapError, load_class_map)

        if self.class_map is not None:
            if not isinstance(self.class_map, str) or not self.class_map:
                raise ConfigError(f"data.class_map = {self.class_map!r} must be the path of "
                                  "a class-map TOML file")
            self.class_scheme = "map"
            try:
                load_class_map(self.class_map)
            except ClassMapError as e:
                raise ConfigError(f"data.class_map: {e}") from None
        _check_choices("data", self)
        if self.class_scheme == "map" and self.class_map is None:
            raise ConfigError("data.class_scheme = 'map' needs data.class_map = FILE.toml "
                              "(--class-map)")
        t = self.unlabeled_threshold
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)):
            raise ConfigError(f"data.unlabeled_threshold = {t!r} must be a finite number of "
                              "standard deviations, e.g. 0.5 (the study's code) or 0 (the mean)")
        if t != DEFAULT_UNLABELED_THRESHOLD and self.class_scheme != "unlabeled-binary":
            raise ConfigError(f"data.unlabeled_threshold = {t} only applies to class_scheme "
                              f"'unlabeled-binary', not {self.class_scheme!r}")
        if self.pred_threshold != "fixed" and self.class_scheme not in BINARY_SCHEMES:
            raise ConfigError(f"data.pred_threshold = {self.pred_threshold!r} applies to the "
                              f"binary schemes ({', '.join(BINARY_SCHEMES)}), not to "
                              f"{self.class_scheme!r}")


@dataclass
class TrainConfig:
    """Optimisation, precision, engine, batch and stopping rules.

    Attributes:
        local_batch_size: images per worker per micro-step (the per-worker batch).
        global_batch_size: images per optimizer step over all workers
            (``local_batch_size x world_size x grad_accum``). Set it (with
            ``strong_scaling``) to fix the global batch; otherwise :func:`resolve` derives
            it. A resolved configuration holds both.
        world_size: worker processes of the run (resolved from the launcher).
        epochs: the accuracy budget in epochs (an equal sample budget at every worker
            count).
        steps: if set, stop training after this many optimizer steps instead.
        warmup_steps: steps excluded from timing statistics.
        measure_steps: timed steps after warm-up, whatever the dataset size, epochs or
            worker count: the loader loops as needed (throughput window).
        lr: the learning rate at the 1-worker batch; :attr:`effective_lr` applies
            ``lr_scaling`` for the run's global batch (Goyal et al. 2017).
        lr_scaling: ``linear``, ``sqrt`` or ``none``: how lr grows with the global batch
            over the local batch (weak scaling).
        lr_warmup_steps: linear lr warm-up from ~0 at the start of training (``None``: 5 %
            of the steps when the lr is scaled, else none).
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + loss scaling).
        engine: ``single`` (no wrapper), ``ddp``, ``deepspeed`` or ``fsdp``.
        zero_stage: DeepSpeed ZeRO stage 0-3.
        patience: early-stopping patience in validations on ``monitor`` (0 = off).
        target_miou: record the training time at which validation mIoU first reaches it.
        strong_scaling: keep the global batch fixed as workers are added.
        threads: CPU threads per worker (``None``: usable cores / local workers).
        timeout_s: the collective timeout in seconds (a dead peer fails the job).
        save_checkpoints: mode ``throughput`` only: also write ``last.pt`` and
            ``checkpoint.pt`` (off: a speed run writes none, so no write sits in its
            wall clock; the accuracy budget always writes them).
    """

    local_batch_size: int = 8
    global_batch_size: int | None = None
    world_size: int = 1
    epochs: int = 8
    steps: int | None = None
    warmup_steps: int = 3
    measure_steps: int = 30
    lr: float = 3e-3
    lr_scaling: str = "linear"
    lr_warmup_steps: int | None = None
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
    sync_bn: bool = False
    threads: int | None = None
    timeout_s: float = 600.0
    save_checkpoints: bool = False

    def __post_init__(self) -> None:
        for name in ("local_batch_size", "world_size", "epochs", "grad_accum", "val_every"):
            _positive("train", name, getattr(self, name), integer=True)
        for name in ("steps", "global_batch_size", "threads"):
            if getattr(self, name) is not None:
                _positive("train", name, getattr(self, name), integer=True)
        for name in ("warmup_steps", "measure_steps", "patience", "seed"):
            _positive("train", name, getattr(self, name), allow_zero=True, integer=True)
        if self.lr_warmup_steps is not None:
            _positive("train", "lr_warmup_steps", self.lr_warmup_steps, allow_zero=True,
                      integer=True)
        _positive("train", "lr", self.lr)
        _positive("train", "weight_decay", self.weight_decay, allow_zero=True)
        _positive("train", "timeout_s", self.timeout_s)
        _fraction("train", "target_miou", self.target_miou)
        _check_choices("train", self)
        spec = engine_spec(self.engine)
        if not spec.staged and self.zero_stage != 0:
            raise ConfigError(f"train.zero_stage = {self.zero_stage} only applies to "
                              f"--engine {', '.join(_staged_engines())}")
        if spec.single_process and self.world_size > 1:
            raise ConfigError(f"train.engine = {self.engine!r} runs one process, but "
                              f"world_size is {self.world_size}; use --engine "
                              f"{', '.join(_group_engines())}")

    @property
    def per_worker_batch(self) -> int:
        """Images per worker per micro-step: the one accessor every consumer uses."""
        return self.local_batch_size

    @property
    def reference_batch(self) -> int:
        """The global batch at which :attr:`lr` is given: one worker's batch (weak
        scaling), or the fixed global batch (strong scaling: the lr does not change)."""
        if self.strong_scaling and self.global_batch_size:
            return self.global_batch_size
        return self.local_batch_size * self.grad_accum

    @property
    def effective_lr(self) -> float:
        """``lr`` scaled by ``lr_scaling`` for this run's global batch."""
        ratio = (self.global_batch_size or self.reference_batch) / self.reference_batch
        if self.lr_scaling == "linear":
            return self.lr * ratio
        if self.lr_scaling == "sqrt":
            return self.lr * math.sqrt(ratio)
        return self.lr


@dataclass
class RunConfig:
    """One configuration of the benchmark: what the sweep varies and train.py runs.

    Attributes:
        mode: ``throughput`` (the timed window only), ``accuracy`` (the budget only) or
            ``both``.
        out: the run's output folder.
        run_id: its id in a sweep (the row's ``run_id``).
        sweep_id: the sweep it belongs to.
        resolved: set by :func:`resolve`; a job checks such a configuration
            (:func:`check_resolved`) instead of resolving it again.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mode: str = "both"
    out: str = "runs/latest"
    run_id: str = ""
    sweep_id: str = ""
    resolved: bool = False

    def __post_init__(self) -> None:
        _check_choices("run", self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"]["widths"] = list(self.model.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Build from a dict (a parsed TOML/JSON file); unknown keys are errors.

        Files written before local/global batch became fields hold ``train.batch_size``
        (the per-worker batch, or the global one under ``strong_scaling``): still read.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a configuration must be a table of sections, got "
                              f"{type(d).__name__}")
        d = dict(d)
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
        kwargs: dict[str, Any] = {}
        for key, klass in sections.items():
            sec = d.pop(key, {}) or {}
            if not isinstance(sec, dict):
                raise ConfigError(f"[{key}] must be a table of fields, got {sec!r}")
            sec = dict(sec)
            if key == "train":
                _legacy_train_fields(sec)
            if key == "model" and sec.get("kernel") == 0:
                sec["kernel"] = None  # older files: 0 stood for the architecture's default
            known = {f.name for f in dataclasses.fields(klass)}
            unknown = set(sec) - known
            if unknown:
                raise ConfigError(f"unknown field(s) in [{key}]: {', '.join(sorted(unknown))}; "
                                  f"known: {', '.join(sorted(known))}")
            try:
                kwargs[key] = klass(**sec)
            except TypeError as e:
                raise ConfigError(f"[{key}]: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)} - set(sections)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown top-level field(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs, **d)


def _legacy_train_fields(sec: dict[str, Any]) -> None:
    """Read configs written by earlier versions (in place)."""
    if "batch_size" in sec:
        b = sec.pop("batch_size")
        if sec.get("strong_scaling"):
            sec.setdefault("global_batch_size", b)
            sec.setdefault("local_batch_size", b)  # replaced by resolve()
        else:
            sec.setdefault("local_batch_size", b)
    for name in ("steps", "threads"):
        if sec.get(name) == 0:
            sec[name] = None  # 0 once stood for "not set"
    if sec.get("deepspeed_config") == "":
        sec["deepspeed_config"] = None


def resolve(cfg: RunConfig, world_size: int) -> tuple[RunConfig, list[str]]:
    """The configuration a run of ``world_size`` workers actually uses.

    Applied once, before the configuration is written and before any job starts (the
    sweep resolves in its driver, train.py in the job): the per-worker and global batch,
    the mode rule of the synthetic loader. Idempotent.

    Returns:
        (the resolved copy, notes: one line per value the rules changed).

    Raises:
        ConfigError: a global batch that does not split over the workers, and the like.
    """
    _positive("train", "world_size", world_size, integer=True)
    notes: list[str] = []
    d = cfg.to_dict()
    t = d["train"]
    t["world_size"] = world_size
    if t["strong_scaling"]:
        g = t["global_batch_size"] or t["local_batch_size"] * t["grad_accum"]
        per_step = world_size * t["grad_accum"]
        if g % per_step:
            raise ConfigError(f"strong scaling: the global batch {g} does not split over "
                              f"{world_size} worker(s) x grad_accum {t['grad_accum']}; choose "
                              f"a multiple of {per_step}")
        t["global_batch_size"], t["local_batch_size"] = g, g // per_step
    else:
        g = t["local_batch_size"] * world_size * t["grad_accum"]
        if t["global_batch_size"] not in (None, g):
            raise ConfigError(f"train.global_batch_size = {t['global_batch_size']} but "
                              f"{t['local_batch_size']} per worker x {world_size} worker(s) x "
                              f"grad_accum {t['grad_accum']} = {g}; set --strong-scaling to "
                              "fix the global batch, or drop global_batch_size")
        t["global_batch_size"] = g
    if engine_spec(t["engine"]).single_process and world_size > 1:
        raise ConfigError(f"--engine {t['engine']} runs one process, not {world_size}; use "
                          f"{', '.join(_group_engines())}")
    loader = loader_spec(d["data"]["loader"])
    if not loader.measures_accuracy and d["mode"] != "throughput":
        notes.append(f"loader {loader.name!r} feeds random tensors: accuracy cannot be "
                     f"measured, so mode {d['mode']!r} becomes 'throughput'")
        d["mode"] = "throughput"
    d["resolved"] = True
    return RunConfig.from_dict(d), notes


def check_resolved(cfg: RunConfig, world_size: int) -> None:
    """Check (not redo) a configuration :func:`resolve` produced, against the job that
    runs it: its worker count and the batch and mode rules.

    Raises:
        ConfigError: what disagrees, and how to fix it.
    """
    t = cfg.train
    if t.world_size != world_size:
        raise ConfigError(f"the configuration was resolved for {t.world_size} worker(s) but "
                          f"the job has {world_size}; launch it with {t.world_size} "
                          "worker(s), or drop `resolved` from the file to resolve it anew")
    per_step = world_size * t.grad_accum
    if t.global_batch_size != t.local_batch_size * per_step:
        raise ConfigError(f"train.global_batch_size = {t.global_batch_size} but "
                          f"{t.local_batch_size} per worker x {world_size} worker(s) x "
                          f"grad_accum {t.grad_accum} = {t.local_batch_size * per_step}: "
                          "the file was edited after it was resolved; drop `resolved` from "
                          "it to resolve it anew")
    if not loader_spec(cfg.data.loader).measures_accuracy and cfg.mode != "throughput":
        raise ConfigError(f"loader {cfg.data.loader!r} measures throughput only, but mode is "
                          f"{cfg.mode!r}; drop `resolved` from the file to resolve it anew")


def _drop_none(d: Any) -> Any:
    # TOML has no null: an unset optional field is simply absent from the file.
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the configuration as TOML (or JSON when the suffix is ``.json``), atomically."""
    import tomli_w

    from segcore.io import write_text_atomic

    d = _drop_none(cfg.to_dict())
    path = Path(path)
    text = json.dumps(d, indent=2) if path.suffix == ".json" else tomli_w.dumps(d)
    write_text_atomic(path, text)


def load_config(path: str | Path) -> RunConfig:
    """Load a configuration written by :func:`dump_config` (TOML or JSON).

    Raises:
        ConfigError: a missing file, a syntax error (with the file and line) or an invalid
            value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.suffix == ".json":
            d = json.loads(path.read_text(encoding="utf-8"))
        else:
            with path.open("rb") as f:
                d = tomllib.load(f)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid "
                          f"{'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    try:
        return RunConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# The sections of a configuration, by the name its files and dotted paths use ("run" is
# the top level).
SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                             "run": RunConfig}
