"""The sweep's grid: a :class:`SweepSpec` expanded into jobs, each a resolved RunConfig.

The driver validates every configuration here, before any job starts: a bad value fails
the whole sweep at once with the usual one-line error, and each job later receives its
configuration as a file (``configs/<run-id>.toml``), not as flag strings.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segcore.config import ConfigError, RunConfig, resolve, widths_for_depth
from segcore.registry import engine_spec, loader_spec, parse_engine_axis


@dataclass(frozen=True)
class Job:
    """One configuration of the grid: its id, workers per node, resolved config, and the
    values of the generic axes (``--axis``) it takes, recorded as ``axis.<path>`` columns."""

    run_id: str
    workers: int  # per node
    config: RunConfig
    repeat: int = 0
    axes: tuple[tuple[str, Any], ...] = ()

    def axis_columns(self) -> dict[str, Any]:
        return {f"axis.{path}": value for path, value in self.axes}


@dataclass
class SweepSpec:
    """The grid and how to run it (built by ``launch/sweep.py`` from its flags).

    ``overrides`` are configuration values for every job (``--set``, ``--train-arg``),
    as nested ``{"data": {"synthetic_images": 40}}``; ``preset_rows`` a preset's explicit
    configurations (replacing the batch x depth product); ``axes`` any configuration
    field as one more axis of the grid (``--axis train.lr=1e-3,3e-3``: ``{"train.lr":
    ["1e-3", "3e-3"]}``, typed by the field).
    """

    workers: list[int]
    batch_sizes: list[int]
    depths: list[int]
    engines: list[str]  # "ddp", "deepspeed:2", "single", "fsdp"
    loaders: list[str]
    precisions: list[str]
    channels_last: list[bool]
    data: str = "synthetic"
    classes: str = "six"
    arch: str = "modern"
    mode: str = "both"
    image_size: int = 128
    epochs: int = 3
    steps: int | None = None
    warmup_steps: int = 3
    measure_steps: int = 30
    lr: float | None = None
    lr_scaling: str = "linear"
    repeats: int = 1
    strong_scaling: bool = False
    threads: int | None = None
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    timeout_s: float = 1800.0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    preset_rows: list[dict[str, Any]] | None = None
    axes: dict[str, list[str]] = field(default_factory=dict)
    # Columns every row of the sweep carries (how its batch was chosen: the GPU preset's
    # memory probe).
    row_extra: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None

    # How the jobs reach each other and how long they may take, not what they are: a
    # resumed sweep (a new Slurm job: another rendezvous endpoint) may differ here; and
    # what the rows are told about how the grid was made (row_extra).
    TRANSPORT = ("timeout_s", "rdzv_endpoint", "row_extra")

    def to_dict(self) -> dict[str, Any]:
        """What defines the grid (recorded in the folder; ``--resume`` must match it,
        :data:`TRANSPORT` aside)."""
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The fields that have a default, with it (what an older record left out)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out


def parse_engine(value: str) -> tuple[str, int]:
    """``ddp`` -> ("ddp", 0); ``deepspeed:2`` -> ("deepspeed", 2) (the registry's rule)."""
    try:
        return parse_engine_axis(value)
    except ConfigError as e:
        raise ConfigError(f"--engines: {e}") from None


# What each preset sets, so that a preset never silently overrides a flag the user gave.
PRESET_FIELDS = {"paper": ("arch", "batch_sizes", "depths", "classes", "lr", "steps"),
                 "smoke": ("batch_sizes", "depths", "classes", "image_size", "epochs"),
                 "gpu": ("batch_sizes", "depths", "classes", "image_size", "loaders",
                         "precisions", "mode", "arch")}
PRESETS = tuple(PRESET_FIELDS)
# The GPU workload: the original U-Net widths at 512 px crops, bf16 channels-last, eager
# and compiled, on device-made batches; the per-GPU batch is probed at start
# (segcore.train.probe: the largest that fits in GPU_HEADROOM less than the memory).
GPU_WIDTHS = "64,128,256,512,1024"
GPU_IMAGE_SIZE = 512
GPU_HEADROOM = 0.2
GPU_CPU_BATCH = 2  # no GPU to probe: the preset runs (slowly) with this batch


def preset(name: str, epochs: int | None = None) -> dict[str, Any]:
    """Named grids. ``paper``: the reference study's nine named sessions (Tables 2 and 4)
    plus its 24-class and unlabeled-binary runs, each with its own lr, batch, widths,
    epochs, augmentation and classes (:mod:`segcore.results.study`; ``epochs`` replaces
    every session's for a short run). ``smoke``: one tiny configuration. ``gpu``: a
    workload that loads a GPU (:data:`GPU_WIDTHS` at :data:`GPU_IMAGE_SIZE` px, bf16,
    channels-last, eager and compiled, the batch probed at start)."""
    if name == "paper":
        from segcore.results.study import preset_rows

        return {"arch": "paper", "rows": preset_rows(epochs)}
    if name == "smoke":
        return {"rows": [{"classes": "six", "batch": 4, "widths": "8,16", "augment": True}],
                "image_size": 64, "epochs": 1}
    if name == "gpu":
        return {"rows": [{"classes": "six", "batch": GPU_CPU_BATCH, "widths": GPU_WIDTHS,
                          "augment": True}],
                "arch": "modern", "image_size": GPU_IMAGE_SIZE, "loaders": ["synthetic"],
                "precisions": ["bf16"], "channels_last": [True], "mode": "throughput",
                "axes": {"model.compile": ["false", "true"]}, "probe_batch": True}
    raise ConfigError(f"--preset {name!r} is unknown; choose one of: {', '.join(PRESETS)}")


def _slug(v: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", v)


def _merge(d: dict[str, Any], over: dict[str, Any]) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            _merge(d[k], v)
        else:
            d[k] = v


def axis_values(spec: SweepSpec) -> list[tuple[tuple[str, Any], ...]]:
    """Every combination of the generic axes' values, typed by their fields."""
    from segcore.cli import field

    typed = []
    for path, texts in spec.axes.items():
        f = field(path)
        values = [f.parse(t) for t in texts]
        if len(set(map(str, values))) != len(values):
            raise ConfigError(f"--axis {path}: a value is given twice ({', '.join(texts)})")
        typed.append([(path, v) for v in values])
    return list(itertools.product(*typed))


def decode_left_out(spec: SweepSpec, loader: str,
                    axes: tuple[tuple[str, Any], ...]) -> bool:
    """A loader paired with a ``data.decode`` it does not take (``--loaders torch,dali
    --decodes cpu,gpu``: DALI has its own decode) is left out of the grid, as a
    single-process engine is at more than one worker; when the loader takes none of the
    decodes asked for, the job's configuration says why instead."""
    decode = dict(axes).get("data.decode")
    if decode is None:
        return False
    takes = loader_spec(loader).decodes
    return decode not in takes and any(v in takes for v in spec.axes["data.decode"])


def _axis_id(path: str, value: Any) -> str:
    v = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return f"{path.rpartition('.')[2].replace('_', '')}{_slug(format(v, 'g') if isinstance(v, float) else str(v))}"


def job_config(spec: SweepSpec, row: dict[str, Any], engine: str, stage: int, loader: str,
               precision: str, channels_last: bool, world: int, run_id: str,
               sweep_id: str, out: str,
               axes: tuple[tuple[str, Any], ...] = ()) -> RunConfig:
    """The resolved configuration of one job (validated: raises ConfigError)."""
    d = RunConfig().to_dict()
    d.update(mode=spec.mode, run_id=run_id, sweep_id=sweep_id, out=out)
    m, data, t = d["model"], d["data"], d["train"]
    m.update(arch=spec.arch, widths=[int(w) for w in row["widths"].split(",")],
             kernel=None, channels_last=channels_last)
    if spec.arch == "paper":
        m["norm"] = "none"
    data.update(source=spec.data, class_scheme=row["classes"], image_size=spec.image_size,
                loader=loader, augment=row.get("augment", True),
                class_map=row.get("class_map"))
    t.update(engine=engine, zero_stage=stage, precision=precision,
             epochs=row.get("epochs") or spec.epochs,
             steps=spec.steps, warmup_steps=spec.warmup_steps,
             measure_steps=spec.measure_steps, lr_scaling=spec.lr_scaling,
             strong_scaling=spec.strong_scaling, threads=spec.threads)
    if spec.strong_scaling:
        t.update(global_batch_size=row["batch"], local_batch_size=row["batch"])
    else:
        t.update(local_batch_size=row["batch"], global_batch_size=None)
    lr = row.get("lr", spec.lr)
    if lr is not None:
        t["lr"] = lr
    _merge(d, spec.overrides)
    for path, value in axes:
        section, _, name = path.partition(".")
        _merge(d, {name: value} if section == "run" else {section: {name: value}})
    try:
        cfg, _notes = resolve(RunConfig.from_dict(d), world)
    except ConfigError as e:
        raise ConfigError(f"configuration {run_id}: {e}") from None
    return cfg


def expand(spec: SweepSpec, sweep_id: str = "", out_dir: Path | None = None) -> list[Job]:
    """The grid as an ordered list of jobs (workers vary fastest, so each family's
    1-worker baseline runs first); every configuration resolved and validated. Each
    job's output folder is ``out_dir/runs/<run-id>``."""
    for w in spec.workers:
        if w < 1:
            raise ConfigError(f"--gpus: worker counts must be >= 1, got {w}")
    if spec.repeats < 1:
        raise ConfigError(f"--repeats {spec.repeats} must be >= 1")
    base: list[dict[str, Any]] = []
    if spec.preset_rows is not None:
        base = [dict(r) for r in spec.preset_rows]
    else:
        for b, d in itertools.product(spec.batch_sizes, spec.depths):
            base.append({"batch": b, "widths": ",".join(map(str, widths_for_depth(d))),
                         "classes": spec.classes, "augment": True})
    jobs = []
    combos = axis_values(spec)
    for row, engine, loader, prec, cl, axes in itertools.product(
            base, spec.engines, spec.loaders, spec.precisions, spec.channels_last, combos):
        name, stage = parse_engine(engine)
        if decode_left_out(spec, loader, axes):
            continue
        for workers in sorted(spec.workers):
            world = workers * spec.nnodes
            if engine_spec(name).single_process and world > 1:
                continue  # a single-process engine is the 1-worker baseline only
            eng = engine_spec(name).run_id_part(stage)
            if row.get("name"):  # a named session: its name, and what the grid varies
                varied = [(eng, spec.engines), (loader, spec.loaders),
                          (prec, spec.precisions), ("cl" if cl else "nchw",
                                                    spec.channels_last)]
                rid = "-".join([row["name"]] + ([f"w{world}"] if world > 1 else [])
                               + [v for v, axis in varied if len(axis) > 1])
            else:
                rid = "-".join([f"w{world}", row["classes"], f"u{_slug(row['widths'])}",
                                f"b{row['batch']}", eng, loader, prec,
                                "cl" if cl else "nchw"]
                               + ([] if row.get("augment", True) else ["noaug"])
                               + ([f"lr{row['lr']:g}"] if "lr" in row else []))
            rid = "-".join([rid] + [_axis_id(p, v) for p, v in axes])
            for r in range(spec.repeats):
                run_id = rid + (f"-r{r}" if spec.repeats > 1 else "")
                out = str(Path(out_dir or "runs") / "runs" / run_id)
                cfg = job_config(spec, row, name, stage, loader, prec, cl, world, run_id,
                                 sweep_id, out, axes)
                jobs.append(Job(run_id, workers, cfg, r, axes))
    return jobs
