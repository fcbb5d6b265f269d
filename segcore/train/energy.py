"""Energy per image: a cumulative energy counter read at the ends of the timed window.

On a GPU, NVML's total-energy counter of the device (millijoules since the driver
loaded, Volta and later); on a CPU, the RAPL package counters of the powercap interface
(``/sys/class/powercap/intel-rapl:N/energy_uj``, also on AMD with a recent kernel), which
wrap at ``max_energy_range_uj``. Where neither can be read, the row says why in one word
(``energy_why``: ``no-nvml``, ``no-rapl``, ``unreadable``) and leaves the figure empty.
CPU package energy covers the whole socket (other processes too): the report says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

RAPL_ROOT = Path("/sys/class/powercap")


class EnergyCounter:
    """Cumulative joules of the training device (``read``), or why there are none."""

    def __init__(self, device: Any) -> None:
        self.source: str | None = None
        self.why: str | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._rapl: list[tuple[Path, float]] = []
        self._last: dict[Path, float] = {}
        self._wraps: dict[Path, float] = {}
        if getattr(device, "type", str(device)) == "cuda":
            self._open_nvml(getattr(device, "index", None) or 0)
        else:
            self._open_rapl(Path(os.environ.get("SEGBENCH_RAPL_ROOT", RAPL_ROOT)))

    def _open_nvml(self, index: int) -> None:
        try:
            import pynvml

            from segcore.train.memory import _nvml_handle

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = _nvml_handle(pynvml, index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self.source = "nvml"
        except Exception:  # no pynvml, no driver, or a board without the counter
            self.why = "no-nvml"

    def _open_rapl(self, root: Path) -> None:
        # The package domains (intel-rapl:0, intel-rapl:1, ...), not their sub-domains
        # (intel-rapl:0:0, ...), which the package counter already includes.
        zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not zones:
            self.why = "no-rapl"
            return
        try:
            for z in zones:
                top = float((z / "max_energy_range_uj").read_text())
                self._last[z] = float((z / "energy_uj").read_text())
                self._wraps[z] = 0.0
                self._rapl.append((z, top))
        except (OSError, ValueError):  # present but not readable (often root only)
            self._rapl = []
            self.why = "unreadable"
            return
        self.source = "rapl"

    def read(self) -> float | None:
        """Joules so far (an arbitrary origin: take differences), or ``None``."""
        if self.source == "nvml":
            try:
                return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3
            except Exception:
                return None
        if self.source == "rapl":
            total = 0.0
            try:
                for z, top in self._rapl:
                    now = float((z / "energy_uj").read_text())
                    if now < self._last[z]:  # the counter wrapped
                        self._wraps[z] += top
                    self._last[z] = now
                    total += now + self._wraps[z]
            except (OSError, ValueError):
                return None
            return total / 1e6
        return None
