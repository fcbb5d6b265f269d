"""The training checkpoint: one format, written atomically, loaded without unpickling code.

A checkpoint is a dict::

    {"engine": {"model": state_dict, "optimizer": ..., "scaler": ..., "scheduler": ...},
     "epoch": int, "best_score": float | None, "history": [...], "train_time_s": float,
     "config": RunConfig.to_dict(), "class_names": [...]}

A run folder holds ``last.pt`` (every epoch; what ``--resume`` continues from) and
``checkpoint.pt`` (the best epoch; what prediction uses). Training, resume and prediction
all read and write through this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from segcore.io import atomic_file

LAST = "last.pt"
BEST = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not a segbench training checkpoint; the
    message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` through :func:`segcore.io.atomic_file`: a killed or failing write
    (a full disk) leaves the previous checkpoint in place and no temporary file behind."""
    try:
        with atomic_file(path) as f:
            torch.save(state, f)
    except RuntimeError as e:
        # torch.save reports a failed write as RuntimeError ("PytorchStreamWriter failed
        # writing file ..."): the OSError it hides is said as one.
        if "failed writing" not in str(e) and "write failed" not in str(e):
            raise
        import errno
        import shutil

        free = shutil.disk_usage(Path(path).parent).free
        code = errno.ENOSPC if free < 64 << 20 else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from None


def strip_wrapper_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Model weights without the prefixes ``torch.compile`` (``_orig_mod.``) and DDP
    (``module.``) add, so a checkpoint loads into a plain model."""
    out = {}
    for k, v in sd.items():
        stripped = True
        while stripped:  # any nesting: DDP around compile, compile around DDP, ...
            stripped = False
            for prefix in ("_orig_mod.", "module."):
                if k.startswith(prefix):
                    k, stripped = k[len(prefix):], True
        out[k] = v
    return out


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    """Load and validate a checkpoint written by :func:`save_checkpoint`.

    ``weights_only``: no code is unpickled. Model weights come back without wrapper
    prefixes.

    Raises:
        CheckpointError: the file is missing, truncated or damaged, or lacks ``config``
            and ``engine`` -> ``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises many types for a damaged or foreign file
        msg = " ".join(str(e).split())[:200] or "empty or truncated file"
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                              f"{msg}); it may be truncated by a crash or a full disk"
                              ) from None
    if (not isinstance(state, dict) or "config" not in state
            or not isinstance(state.get("engine"), dict) or "model" not in state["engine"]):
        raise CheckpointError(f"checkpoint {path} is not a segbench training checkpoint "
                              "(it needs 'config' and 'engine' -> 'model')")
    state["engine"]["model"] = strip_wrapper_prefixes(state["engine"]["model"])
    return state


def load_for_resume(folder: str | Path, log=lambda _m: None) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to continue a run from: ``last.pt``, or the best ``checkpoint.pt``
    when ``last.pt`` is missing or damaged (said through ``log``).

    Raises:
        CheckpointError: neither file is sound; the message names both.
    """
    folder = Path(folder)
    problems = []
    for name in (LAST, BEST):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} does not exist")
            continue
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            log(f"warning: {problems[-1]}; resuming from {path} instead")
        return path, state
    raise CheckpointError("--resume: no usable checkpoint: " + "; ".join(problems))
