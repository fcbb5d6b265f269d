"""The results schema: every column of a result row, declared once.

A :class:`Column` says what a column is (its group in ``runs.csv``, its type and unit),
how the repeats of one configuration reduce it, whether it tells configurations apart
(a *family* key), and how it reads in a legend. The writers
(:mod:`segcore.results.rows`: the ``runs.csv`` order), the analysis
(:mod:`segcore.results.analysis`: typed columns, family keys, the repeat reduction) and
the labels of tables and figures (:mod:`segcore.results.labels`) derive their lists from
:data:`COLUMNS`; a column added here reaches all of them.

Memory is in MiB (2^20 bytes) throughout, although the column names keep their
historical ``_mb`` suffix (a public contract of ``runs.csv``, DESIGN.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Column", "COLUMNS", "BY_NAME", "GROUPS", "names", "column", "unit_of",
           "REPEAT_REDUCTIONS"]

# How the repeats of one configuration reduce a column (configurations()): the median
# of a measurement; "first" keeps the first repeat's value (identity, settings).
REPEAT_REDUCTIONS = ("median", "first")
GROUPS = ("identity", "config", "speed", "memory", "accuracy", "extra", "derived")
_DTYPES = ("text", "int", "float", "bool")
_FAMILY = ("", "always", "optional")


@dataclass(frozen=True)
class Column:
    """One column of a result row.

    Attributes:
        name: the key in ``runs.jsonl`` and the header in ``runs.csv``.
        group: ``identity``, ``config``, ``speed``, ``memory``, ``accuracy``, ``extra``
            (the ``runs.csv`` column blocks, in that order) or ``derived`` (computed by
            the analysis when a folder is read, not stored unless annotated).
        dtype: ``text``, ``int``, ``float`` or ``bool``.
        unit: the unit its values are in (``""`` for counts, names and fractions).
        reduce: how repeats of one configuration reduce it (``median`` or ``first``).
        family: ``always``: part of every configuration's identity; ``optional``: part
            of it where a table records it (an axis only some sweeps vary); ``""``: a
            measurement or a detail.
        label: how a value reads in legends and panel titles (``{}`` is the value);
            ``""``: ``"<name> <value>"``.
        meaning: one line for readers of ``runs.csv``.
    """

    name: str
    group: str
    dtype: str
    unit: str = ""
    reduce: str = "first"
    family: str = ""
    label: str = ""
    meaning: str = ""

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"column {self.name}: group {self.group!r} not in {GROUPS}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"column {self.name}: dtype {self.dtype!r} not in {_DTYPES}")
        if self.reduce not in REPEAT_REDUCTIONS:
            raise ValueError(f"column {self.name}: reduce {self.reduce!r} not in "
                             f"{REPEAT_REDUCTIONS}")
        if self.family not in _FAMILY:
            raise ValueError(f"column {self.name}: family {self.family!r} not in {_FAMILY}")

    @property
    def numeric(self) -> bool:
        return self.dtype in ("int", "float")


def _c(name: str, group: str, dtype: str, unit: str = "", reduce: str = "first",
       family: str = "", label: str = "", meaning: str = "") -> Column:
    return Column(name, group, dtype, unit, reduce, family, label, meaning)


_M = "median"
# In runs.csv order within each group (the group blocks follow GROUPS).
COLUMNS: tuple[Column, ...] = (
    # identity
    _c("sweep_id", "identity", "text", meaning="the sweep the row belongs to"),
    _c("run_id", "identity", "text", meaning="the configuration and repeat, unique in a sweep"),
    _c("status", "identity", "text",
       meaning="ok, oom, failed, timeout, diverged, interrupted or skipped"),
    _c("error", "identity", "text", meaning="why a run did not finish, one line"),
    # config
    _c("engine", "config", "text", family="always", meaning="training engine"),
    _c("zero_stage", "config", "int", family="always", meaning="DeepSpeed ZeRO stage"),
    _c("loader", "config", "text", family="always", label="{} loader"),
    _c("precision", "config", "text", family="always", label="{}"),
    _c("channels_last", "config", "bool", family="always",
       meaning="the memory format the run trained in"),
    _c("compile", "config", "bool", family="always", meaning="torch.compile"),
    _c("world_size", "config", "int", meaning="workers (the scaling axis)"),
    _c("nnodes", "config", "int", meaning="hosts"),
    _c("device_type", "config", "text", family="always", label="{}"),
    _c("device_name", "config", "text", family="always", label="{}"),
    _c("batch_size", "config", "int", family="always", meaning="per-worker batch"),
    _c("global_batch_size", "config", "int", meaning="images per optimizer step"),
    _c("arch", "config", "text", family="always", label="{} U-Net"),
    _c("depth", "config", "int", family="always", label="depth {}"),
    _c("widths", "config", "text", family="always", label="widths {}"),
    _c("image_size", "config", "int", "px", family="always", label="{}px crops"),
    _c("class_scheme", "config", "text", family="always", label="{} classes"),
    _c("num_classes", "config", "int", family="always", label="{} classes"),
    _c("params", "config", "int", label="{} params", meaning="trainable parameters"),
    # speed
    _c("warmup_steps", "speed", "int"),
    _c("measured_steps", "speed", "int", meaning="steps the speed figures rest on"),
    _c("throughput_img_s", "speed", "float", "img/s", _M,
       meaning="images per second over all workers, measured steps"),
    _c("step_ms_p50", "speed", "float", "ms", _M),
    _c("step_ms_p90", "speed", "float", "ms", _M),
    _c("step_ms_p99", "speed", "float", "ms", _M, meaning="only from 100 steps"),
    _c("data_wait_pct", "speed", "float", "%", _M,
       meaning="share of step time spent waiting for input"),
    _c("speedup", "speed", "float", "", _M,
       meaning="throughput over the 1-worker run of the same configuration"),
    _c("scaling_efficiency", "speed", "float", "", _M, meaning="speedup / workers"),
    _c("tflops", "speed", "float", "TFLOP/s", _M),
    _c("mfu", "speed", "float", "", _M,
       meaning="achieved FLOP/s over the peak (datasheet on GPU, measured on CPU)"),
    # memory (MiB)
    _c("peak_mem_mb", "memory", "float", "MiB", _M),
    _c("device_mem_mb", "memory", "float", "MiB", _M),
    _c("host_rss_mb", "memory", "float", "MiB", _M),
    _c("gpu_util_pct", "memory", "float", "%", _M),
    _c("power_w", "memory", "float", "W", _M),
    # accuracy
    _c("epochs", "accuracy", "int"),
    _c("train_time_s", "accuracy", "float", "s", _M),
    _c("time_to_target_s", "accuracy", "float", "s", _M),
    _c("val_loss", "accuracy", "float", "", _M),
    _c("aAcc", "accuracy", "float", "", _M),
    _c("mIoU", "accuracy", "float", "", _M),
    _c("mDice", "accuracy", "float", "", _M),
    _c("mAcc", "accuracy", "float", "", _M),
    # extra
    _c("repeat", "extra", "int", meaning="repeat index of the configuration"),
    _c("step_ms_mean", "extra", "float", "ms", _M),
    _c("step_ms_std", "extra", "float", "ms", _M),
    _c("fwd_bwd_ms_p50", "extra", "float", "ms", _M),
    _c("optim_ms_p50", "extra", "float", "ms", _M),
    _c("launch_overhead_s", "extra", "float", "s", _M),
    _c("peak_mem_source", "extra", "text"),
    _c("throughput_spread_pct", "extra", "float", "%",
       meaning="spread of the configuration's repeats (max - min over median)"),
    _c("started_at", "extra", "text"),
    _c("finished_at", "extra", "text"),
    _c("wall_s", "extra", "float", "s"),
    _c("hw_ceiling_speedup", "extra", "float"),
    _c("time_to_target_speedup", "extra", "float", "", _M),
    _c("low_confidence", "extra", "bool"),
    _c("flags", "extra", "text"),
    _c("throughput_ci95_lo", "extra", "float", "img/s", _M),
    _c("throughput_ci95_hi", "extra", "float", "img/s", _M),
    _c("throughput_ci95_pct", "extra", "float", "%", _M),
    _c("oversubscribed", "extra", "bool"),
    _c("hw_parallel_limit", "extra", "int"),
    _c("precision_emulated", "extra", "bool"),
    _c("mem_workload_mb", "extra", "float", "MiB", _M,
       meaning="the run's memory: the maximum over warm-up, training and validation"),
    _c("mem_baseline_mb", "extra", "float", "MiB", _M),
    _c("lr_scaling", "extra", "text", family="optional", label="{} lr scaling"),
    _c("base_lr", "extra", "float"),
    _c("samples_seen", "extra", "int", "", _M),
    _c("F1", "extra", "float", "", _M),
    _c("mConfDiag", "extra", "float", "", _M),
    _c("mAP", "extra", "float", "", _M),
    _c("mAUC", "extra", "float", "", _M),
    _c("session", "extra", "text",
       meaning="the reference study's session a --preset paper row reproduces"),
    _c("data_source", "extra", "text",
       meaning="where training and validation data came from (synthetic or a folder)"),
    _c("val_images", "extra", "int", meaning="validation images the accuracy rests on"),
    _c("mem_warmup_mb", "extra", "float", "MiB", _M),
    _c("mem_train_mb", "extra", "float", "MiB", _M),
    _c("mem_val_mb", "extra", "float", "MiB", _M),
    _c("mem_workload_phase", "extra", "text",
       meaning="the phase whose peak mem_workload_mb is"),
    _c("loader_img_s", "extra", "float", "img/s", _M,
       meaning="the loader iterated alone (no model), on the run's workers, summed over "
               "ranks"),
    _c("loader_img_s_per_worker", "extra", "float", "img/s", _M,
       meaning="loader_img_s per loader worker process (the training process without "
               "workers)"),
    _c("loader_batches", "extra", "int", meaning="batches per rank loader_img_s rests on"),
    _c("loader_s", "extra", "float", "s", meaning="seconds the loader was timed"),
    _c("loader_step_ratio", "extra", "float", "", _M,
       meaning="loader_img_s / throughput_img_s: above 1 the loader outruns the step"),
    _c("decode", "extra", "text", meaning="where the torch loader decoded JPEGs: cpu or gpu"),
    _c("wall_throughput_img_s", "extra", "float", "img/s", _M,
       meaning="images over the whole training window's wall time"),
    _c("measured_time_share", "extra", "float", "", _M,
       meaning="measured step time / wall time of the training window"),
    _c("energy_j_per_img", "extra", "float", "J", _M),
    # recorded by some rows, outside the runs.csv contract's blocks
    _c("mode", "derived", "text", family="always", label="{} mode"),
    _c("strong_scaling", "derived", "bool", family="always"),
    _c("lr", "derived", "float", family="optional", label="lr {}"),
    _c("augment", "derived", "bool", family="optional"),
    _c("optimizer", "derived", "text", family="optional"),
    _c("schedule", "derived", "text", family="optional", label="{} lr schedule"),
    _c("patience", "derived", "int", meaning="early-stopping patience (0: off)"),
    _c("stopped_early", "derived", "bool"),
    _c("loss", "derived", "text", family="optional"),
    _c("class_weights", "derived", "text", family="optional"),
    _c("grad_accum", "derived", "int", family="optional"),
    _c("norm", "derived", "text", family="optional"),
    _c("steps", "derived", "int", "", _M),
    _c("target_miou", "derived", "float", "", _M),
    _c("train_loss_first", "derived", "float"),
    _c("train_loss_last", "derived", "float"),
    # computed by the analysis (segcore.results.analysis.frame)
    _c("speedup_ci95_lo", "derived", "float", "", _M),
    _c("speedup_ci95_hi", "derived", "float", "", _M),
    _c("memory_mb", "derived", "float", "MiB", _M),
    _c("common_speedup", "derived", "float", "", _M,
       meaning="throughput over the common 1-worker baseline (one engine and loader)"),
    _c("common_efficiency", "derived", "float", "", _M,
       meaning="common_speedup / workers"),
    _c("common_baseline", "derived", "text", meaning="the engine/loader of that baseline"),
)
BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
if len(BY_NAME) != len(COLUMNS):
    raise RuntimeError("segcore.results.schema: a column is declared twice")


def names(*, group: str | None = None, dtype: str | tuple[str, ...] | None = None,
          reduce: str | None = None, family: str | None = None,
          stored: bool | None = None) -> tuple[str, ...]:
    """Column names in declaration order, filtered by any of the attributes.

    Args:
        stored: ``True``: only the ``runs.csv`` blocks (every group but ``derived``).
    """
    types = (dtype,) if isinstance(dtype, str) else dtype
    return tuple(c.name for c in COLUMNS
                 if (group is None or c.group == group)
                 and (types is None or c.dtype in types)
                 and (reduce is None or c.reduce == reduce)
                 and (family is None or c.family == family)
                 and (stored is None or (c.group != "derived") == stored))


def column(name: str) -> Column | None:
    """The declared column, or ``None`` (an ``IoU.<class>`` or ``axis.<path>`` column, or
    one a newer version wrote)."""
    return BY_NAME.get(name)


def unit_of(name: str) -> str:
    c = BY_NAME.get(name)
    return c.unit if c is not None else ""


def label_format(name: str) -> str | None:
    """The legend format of a column (``"depth {}"``), or ``None`` when it has none."""
    c = BY_NAME.get(name)
    return c.label if c is not None and c.label else None


def describe() -> list[dict[str, Any]]:
    """The schema as plain records (for docs and ``runs.csv`` readers)."""
    return [{"name": c.name, "group": c.group, "dtype": c.dtype, "unit": c.unit,
             "reduce": c.reduce, "family": c.family, "meaning": c.meaning} for c in COLUMNS]
