"""Mixed-precision policy in one place: fp32, bf16 autocast, fp16 autocast + loss scaling."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """How a step runs in reduced precision.

    Attributes:
        name: ``fp32``, ``bf16`` or ``fp16``.
        device_type: ``cuda`` or ``cpu`` (autocast is per device type).
    """

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self):
        """Context for forward + loss: autocast to the policy's dtype (no-op for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Dynamic loss scaler, enabled only for fp16 (bf16 has fp32's exponent range)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")
