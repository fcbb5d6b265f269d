"""NaN-aware number formatting for console lines, tables and figure labels."""

from __future__ import annotations

import math
from typing import Any, Sequence

DASH = "–"


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


def _cell(v: Any) -> str:
    text = DASH if v is None else str(v)
    # A pipe would end the cell and a newline the row.
    return text.replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table.

    Args:
        headers: column titles.
        rows: cells (any values; ``None`` is written as a dash; pipes and newlines are
            escaped).
        align: per column ``"l"`` or ``"r"``; default left.

    Returns:
        the table, one line per row, ending with a newline.
    """
    align = list(align) if align is not None else ["l"] * len(headers)
    head = [_cell(h) for h in headers]
    body = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(head[i])] + [len(r[i]) for r in body] + [3])
              for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w)
                                 for c, w, a in zip(cells, widths, align)) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if a == "r" else "-" * w
                             for w, a in zip(widths, align)) + " |"
    return "\n".join([line(head), rule] + [line(r) for r in body]) + "\n"
