"""What each engine and each loader is, declared once.

Every list that names engines or loaders derives from the entries here: the config's
choices, the sweep's ``--engines`` parsing and run ids, the memory format rows record,
whether a run needs a process group, the scaling model's communication pattern and
memory kind, and the labels of reports and figures. Adding an engine means its module
(``segcore/train/engines/<name>.py``) plus one :class:`EngineSpec` below.

Imports nothing heavy (no torch): the configuration layer reads it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Mapping


from segcore.errors import ConfigError

# An unknown engine or loader name, or a stage it does not take: the message lists the
# known ones.
RegistryError = ConfigError


# What a data-parallel step sends (the scaling model's patterns, segcore.scaling.model).
COMM_PATTERNS = ("none", "allreduce", "zero12", "sharded")
COMM_PATTERN_LABELS = {"none": "single", "allreduce": "DDP", "zero12": "ZeRO-1/2",
                       "sharded": "ZeRO-3 / FSDP2"}
# What one worker holds (the memory model's kinds, segcore.scaling.memory).
MEMORY_KINDS = ("ddp", "zero1", "zero2", "zero3", "fsdp")
MEMORY_KIND_LABELS = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2",
                      "zero3": "ZeRO-3", "fsdp": "FSDP2"}


def _either(values: Any) -> str:
    """``0, 1, 2 or 3``."""
    v = [str(x) for x in values]
    return v[0] if len(v) == 1 else f"{', '.join(v[:-1])} or {v[-1]}"


@dataclass(frozen=True)
class EngineSpec:
    """One training engine.

    Attributes:
        name: the value of ``train.engine`` and of ``--engine``.
        impl: ``module:Class`` of its :class:`segcore.train.engines.base.Engine`.
        help: one line for ``--help``.
        stages: the ZeRO stages it takes (``(0,)``: none).
        needs_group: it needs a process group (a plain process gets a 1-process one).
        single_process: it runs one process only (the 1-worker baseline).
        trains_nchw: it keeps weights and inputs NCHW whatever ``channels_last`` asks.
        comm: per stage, what a step sends (:data:`COMM_PATTERNS`).
        memory: per stage, what a worker holds (:data:`MEMORY_KINDS`).
    """

    name: str
    impl: str
    help: str
    comm: Mapping[int, str]
    memory: Mapping[int, str]
    stages: tuple[int, ...] = (0,)
    needs_group: bool = True
    single_process: bool = False
    trains_nchw: bool = False

    def __post_init__(self) -> None:
        assert set(self.comm) == set(self.stages) == set(self.memory), self.name
        assert set(self.comm.values()) <= set(COMM_PATTERNS), self.name
        assert set(self.memory.values()) <= set(MEMORY_KINDS), self.name

    @property
    def staged(self) -> bool:
        return self.stages != (0,)

    def check_stage(self, stage: int) -> int:
        stage = int(stage or 0)
        if stage not in self.stages:
            if not self.staged:
                raise RegistryError(f"engine {self.name!r} takes no ZeRO stage (got {stage})")
            raise RegistryError(f"engine {self.name!r}: the ZeRO stage must be "
                                f"{_either(self.stages)}, not {stage}")
        return stage

    def axis_value(self, stage: int = 0) -> str:
        """How ``--engines`` writes it: ``ddp``, ``deepspeed:2``."""
        return f"{self.name}:{int(stage or 0)}" if self.staged else self.name

    def run_id_part(self, stage: int = 0) -> str:
        """Its piece of a sweep run id: ``ddp``, ``ds2``."""
        return f"ds{int(stage or 0)}" if self.staged else self.name

    def label(self, stage: int | None = 0) -> str:
        """For reports and legends: ``ddp``, ``deepspeed ZeRO-2``."""
        return f"{self.name} ZeRO-{int(stage)}" if self.staged and stage is not None \
            else self.name

    def load(self) -> type:
        """The engine class (imported on first use: DeepSpeed is heavy)."""
        module, _, cls = self.impl.partition(":")
        return getattr(importlib.import_module(module), cls)


ENGINE_SPECS: dict[str, EngineSpec] = {s.name: s for s in (
    EngineSpec("single", "segcore.train.engines.base:Engine",
               "one process, no wrapper (the 1-worker baseline)",
               comm={0: "none"}, memory={0: "ddp"}, needs_group=False,
               single_process=True),
    EngineSpec("ddp", "segcore.train.engines.ddp:DDPEngine",
               "PyTorch DistributedDataParallel (bucketed gradient all-reduce)",
               comm={0: "allreduce"}, memory={0: "ddp"}),
    EngineSpec("deepspeed", "segcore.train.engines.deepspeed:DeepSpeedEngine",
               "DeepSpeed ZeRO stage 0-3 (--zero-stage)",
               comm={0: "allreduce", 1: "zero12", 2: "zero12", 3: "sharded"},
               memory={0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"},
               stages=(0, 1, 2, 3), trains_nchw=True),
    EngineSpec("fsdp", "segcore.train.engines.fsdp:FSDPEngine",
               "PyTorch FSDP2 (fully_shard per U-Net block)",
               comm={0: "sharded"}, memory={0: "fsdp"}),
)}
ENGINES = tuple(ENGINE_SPECS)


def engine_spec(name: Any, to: str = "") -> EngineSpec:
    """The entry of engine ``name``; an unknown name lists the known ones (``to``: whom
    it is unknown to, for the message)."""
    try:
        return ENGINE_SPECS[str(name)]
    except KeyError:
        raise RegistryError(f"engine {name!r} is unknown{' to ' + to if to else ''}; "
                            f"known: {', '.join(ENGINES)}") from None


def engine_axis_choices() -> str:
    """Every value ``--engines`` takes: ``single, ddp, deepspeed:0, ..., fsdp``."""
    return ", ".join(e.axis_value(s) for e in ENGINE_SPECS.values() for s in e.stages)


def parse_engine_axis(value: str) -> tuple[str, int]:
    """``ddp`` -> ("ddp", 0); ``deepspeed:2`` -> ("deepspeed", 2)."""
    name, colon, stage = value.partition(":")
    if name not in ENGINE_SPECS:
        raise RegistryError(f"{value!r} is not an engine; use {engine_axis_choices()}")
    spec = ENGINE_SPECS[name]
    if colon and not spec.staged:
        raise RegistryError(f"{value!r}: only "
                            f"{', '.join(e.name for e in ENGINE_SPECS.values() if e.staged)} "
                            "takes a ZeRO stage")
    if not stage.strip().isdigit() and stage:
        raise RegistryError(f"{value!r}: the ZeRO stage must be {_either(spec.stages)}")
    return name, spec.check_stage(int(stage or 0))


def comm_pattern(engine: str, zero_stage: int = 0) -> str:
    """What an engine sends per step (:data:`COMM_PATTERNS`)."""
    spec = engine_spec(engine, "the scaling model")
    return spec.comm[spec.check_stage(zero_stage)]


def memory_kind(engine: str, zero_stage: int = 0) -> str:
    """What one worker of an engine holds (:data:`MEMORY_KINDS`)."""
    spec = engine_spec(engine, "the memory model")
    return spec.memory[spec.check_stage(zero_stage)]


@dataclass(frozen=True)
class LoaderSpec:
    """One training-data loader.

    Attributes:
        name: the value of ``data.loader`` and of ``--loader``.
        help: one line for ``--help``.
        measures_accuracy: it feeds real images and masks (``synthetic`` feeds random
            tensors: its runs measure throughput only).
        needs_index_masks: it reads index masks, not colour masks.
        decodes: where it can decode the training JPEGs (``data.decode``): ``cpu`` (in
            the loader's own way: worker processes, DALI's pipeline) and ``gpu`` (nvJPEG
            in the training process, :mod:`segcore.data.gpu_loader`).
    """

    name: str
    help: str
    measures_accuracy: bool = True
    needs_index_masks: bool = False
    decodes: tuple[str, ...] = ("cpu",)


DECODES = ("cpu", "gpu")

LOADER_SPECS: dict[str, LoaderSpec] = {s.name: s for s in (
    LoaderSpec("torch", "torch DataLoader: decode (or, with --decode gpu, read), crop and "
               "flip in worker processes", decodes=DECODES),
    LoaderSpec("dali", "NVIDIA DALI: decode on the GPU when training on CUDA, else CPU",
               needs_index_masks=True),
    LoaderSpec("synthetic", "random tensors already on the device (compute only)",
               measures_accuracy=False),
)}
LOADERS = tuple(LOADER_SPECS)


def loader_spec(name: Any) -> LoaderSpec:
    try:
        return LOADER_SPECS[str(name)]
    except KeyError:
        raise RegistryError(f"loader {name!r} is unknown; known: "
                            f"{', '.join(LOADERS)}") from None
