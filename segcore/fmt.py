"""NaN-aware number formatting for console lines, tables and figure labels."""

from __future__ import annotations

import math
from typing import Any


def missing(v: Any) -> bool:
    """None, NaN, pandas NA/NaT, or a non-number: nothing to print."""
    if v is None:
        return True
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return True


def fmt(v: Any, spec: str = ".3g", suffix: str = "", none: str = "-") -> str:
    """``format(v, spec) + suffix``, or ``none`` when ``v`` is missing (see :func:`missing`)."""
    return none if missing(v) else format(float(v), spec) + suffix
