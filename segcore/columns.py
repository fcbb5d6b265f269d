"""The configuration columns of a results row, filled from its :class:`RunConfig`.

One function for every row, ok or failed: the sweep's failure rows and the job's own
row describe a configuration in exactly the same columns and values.
"""

from __future__ import annotations

from typing import Any

from segcore.config import RunConfig
from segcore.registry import engine_spec


def config_columns(cfg: RunConfig, *, nnodes: int, device_type: str,
                   device_name: str) -> dict[str, Any]:
    """The configuration columns of ``runs.csv`` for a resolved configuration.

    ``batch_size`` is the per-worker batch under weak and strong scaling alike;
    ``params`` is counted on the meta device (no memory, no compute).
    """
    import torch

    from segcore.data.classes import scheme_for
    from segcore.model import build_model, count_params

    m, d, t = cfg.model, cfg.data, cfg.train
    sch = scheme_for(d)
    with torch.device("meta"):
        params = count_params(build_model(m, sch.num_classes, binary=sch.is_binary))
    return {
        "engine": t.engine, "zero_stage": t.zero_stage, "loader": d.loader,
        "precision": t.precision, "compile": m.compile,
        # What runs: some engines keep weights and inputs NCHW (registry.trains_nchw).
        "channels_last": row_channels_last(cfg),
        "channels_last_requested": m.channels_last,
        "world_size": t.world_size, "nnodes": nnodes, "device_type": device_type,
        "device_name": device_name, "batch_size": t.per_worker_batch,
        "global_batch_size": t.global_batch_size, "arch": m.arch, "depth": m.depth,
        "widths": "-".join(map(str, m.widths)), "image_size": d.image_size,
        "class_scheme": sch.name, "num_classes": sch.num_classes, "params": params,
        "mode": cfg.mode, "strong_scaling": t.strong_scaling, "lr": t.effective_lr,
        "base_lr": t.lr, "lr_scaling": t.lr_scaling, "optimizer": t.optimizer,
        "schedule": t.schedule, "patience": t.patience,
        "augment": d.augment, "grad_accum": t.grad_accum, "sync_bn": t.sync_bn,
        "epochs_budget": t.epochs,
    }


def row_channels_last(cfg: RunConfig) -> bool:
    """The memory format a configuration trains in, as its rows record it."""
    return cfg.model.channels_last and not engine_spec(cfg.train.engine).trains_nchw
