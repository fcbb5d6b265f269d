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


# CPU feature flags (from /proc/cpuinfo) that execute each reduced precision natively.
_NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``SEGBENCH_CPU_FLAGS`` overrides, for tests and for
    checking how the suite behaves on another kind of CPU)."""
    import os

    forced = os.environ.get("SEGBENCH_CPU_FLAGS")
    if forced is not None:
        return set(forced.replace(",", " ").split())
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def native_precision(name: str, device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` computes precision ``name`` natively, and why.

    bf16 on a CPU without AVX512-BF16 or AMX is emulated (a bf16 matmul ran ~500x slower
    than fp32 on an AVX2-only host); on CUDA, bf16 needs compute capability 8.0 (Ampere)
    and fp16 tensor cores 7.0 (Volta).

    Returns:
        (native, reason): reason names the flag or capability the answer rests on.
    """
    device = torch.device(device)
    if name == "fp32":
        return True, "fp32 is native everywhere"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        need = (8, 0) if name == "bf16" else (7, 0)
        ok = (major, minor) >= need
        return ok, (f"compute capability {major}.{minor} "
                    f"{'>=' if ok else '<'} {need[0]}.{need[1]} for {name}")
    flags = cpu_flags()
    have = [f for f in _NATIVE_CPU_FLAGS.get(name, ()) if f in flags]
    if have:
        return True, f"CPU flag {have[0]}"
    return False, (f"this CPU has none of {', '.join(_NATIVE_CPU_FLAGS.get(name, ()))}: "
                   f"{name} is emulated in software and runs many times slower than fp32")
