"""A training checkpoint -> a model ready for inference.

The checkpoint format (and its checks, and the stripping of ``torch.compile`` / DDP
wrapper prefixes) belongs to :mod:`segcore.train.checkpoint`; this module builds the
architecture its saved config describes, checks that the weights and class names fit
it, and puts it on a device in eval mode. Every failure is one :class:`PredictError`
line naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from segcore.config import ConfigError, RunConfig
from segcore.data.classes import ClassScheme, scheme_for
from segcore.faults import one_line
from segcore.predict import PredictError
from segcore.train.checkpoint import CheckpointError, load_checkpoint

__all__ = ["DEVICES", "LoadedModel", "resolve_device", "load_model"]

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class LoadedModel:
    """A checkpoint's model, ready for inference.

    Attributes:
        model: the U-Net in eval mode, on ``device``.
        cfg: the configuration saved in the checkpoint.
        scheme: its class scheme.
        num_out_channels: model outputs (1 for the binary sigmoid head).
        device: where the model runs.
        epoch: the checkpoint's epoch.
        path: the checkpoint file.
    """

    model: torch.nn.Module
    cfg: RunConfig
    scheme: ClassScheme
    num_out_channels: int
    device: torch.device
    epoch: Any
    path: Path


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda, but no CUDA device is available; use --device "
                           "cpu or auto")
    return torch.device(name)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Build the model described by a checkpoint's saved config and load its weights.

    Args:
        path: ``checkpoint.pt`` written by a training run.
        device: where to put the model.

    Returns:
        A :class:`LoadedModel` (model in eval mode).

    Raises:
        PredictError: a missing or unreadable file, a file that is not a segbench
            checkpoint, an invalid saved config, class names that differ from the
            config's scheme, weights that do not fit the saved architecture, or
            non-finite weights (a diverged run).
    """
    from segcore.model.unet import build_model

    path = Path(path)
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except CheckpointError as e:
        raise PredictError(str(e)) from None
    try:
        cfg = RunConfig.from_dict(ckpt["config"])
    except (ConfigError, TypeError) as e:
        raise PredictError(f"checkpoint {path} holds an invalid config: "
                           f"{one_line(e)}") from None
    sch = scheme_for(cfg.data)
    names = ckpt.get("class_names")
    if names is not None and tuple(names) != sch.names:
        raise PredictError(f"checkpoint {path}: its class_names {list(names)} are not those "
                           f"of its config's {sch.name!r} scheme {list(sch.names)}")
    model = build_model(cfg.model, sch.num_classes, binary=sch.is_binary)
    try:
        model.load_state_dict(ckpt["engine"]["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise PredictError(
            f"checkpoint {path} does not match its saved config (arch/widths/classes: "
            f"{cfg.model.arch}, widths {list(cfg.model.widths)}, {sch.name} with "
            f"{sch.num_classes} classes): {one_line(e, 300)}") from None
    bad = [k for k, v in model.state_dict().items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise PredictError(f"checkpoint {path} holds non-finite weights ({len(bad)} "
                           f"tensor(s), e.g. {bad[0]}): its training diverged; use a "
                           "checkpoint of an earlier run, or retrain with a lower --lr")
    device = torch.device(device)
    model = model.to(device).eval()
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return LoadedModel(model, cfg, sch, 1 if sch.is_binary else sch.num_classes, device,
                       ckpt.get("epoch"), path)
