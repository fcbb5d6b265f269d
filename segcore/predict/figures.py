"""Prediction figures: colour overlays of a class map, and the folder's summary figure.

Drawing only: the numbers come from :mod:`segcore.predict.flood` via the folder run's
rows. matplotlib is imported inside :func:`plot_summary`, so importing this module (or
the folder orchestrator) does not load it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from segcore.data.classes import ClassScheme
from segcore.io import save_figure_atomic, write_bytes_atomic

__all__ = ["save_image", "overlay", "plot_summary"]


def save_image(im: Image.Image, path: Path, fmt: str, **kw: Any) -> None:
    """Encode ``im`` as ``fmt`` (PIL options ``kw``) and write it atomically."""
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    write_bytes_atomic(path, buf.getvalue())


def overlay(image: np.ndarray, classes: np.ndarray, sch: ClassScheme, alpha: float = 0.5,
            max_side: int = 2048) -> Image.Image:
    """The colour map blended over the photo, downscaled to ``max_side`` (0: full size).

    Classes drawn in black (``unlabeled``, binary ``rest``) are left transparent, so the
    photo shows where nothing was asserted.
    """
    H, W = classes.shape
    scale = 1.0 if not max_side or max(H, W) <= max_side else max_side / max(H, W)
    photo = Image.fromarray(image)
    cls = Image.fromarray(classes)
    if scale < 1.0:
        size = (max(1, round(W * scale)), max(1, round(H * scale)))
        photo = photo.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        cls = cls.resize(size, Image.Resampling.NEAREST)
    p = np.asarray(photo).astype(np.float32)
    c = np.asarray(cls)
    color = sch.colorize(c).astype(np.float32)
    a = np.where(color.any(axis=-1, keepdims=True), np.float32(alpha), np.float32(0.0))
    return Image.fromarray(np.clip(p * (1 - a) + color * a + 0.5, 0, 255).astype(np.uint8))


def plot_summary(rows: Sequence[Mapping[str, Any]], all_row: Mapping[str, Any], path: Path,
                 title_note: str = "") -> None:
    """``summary.png``: surface shares per image and C typical with its low-high range.

    Shares are of *all* pixels, so each bar sums to 1 and the unknown share is visible
    (the surface fractions in the table are of classified pixels).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    items = [*rows, all_row]
    labels = [Path(r["image"]).stem if r is not all_row else "ALL" for r in items]
    n = len(items)

    def nz(v: Any) -> float:
        return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    unknown = np.array([nz(r["unknown_fraction"]) for r in items])
    known = 1.0 - unknown
    parts = [("impervious", "impervious_fraction", "#6b6b6b"),
             ("pervious", "pervious_fraction", "#4c9a2a"),
             ("water", "water_fraction", "#2a6fd1")]
    fig = Figure(figsize=(min(max(8.0, 3 + 0.35 * n), 24), 7.5))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    x = np.arange(n)
    bottom = np.zeros(n)
    edge = ["black" if r is all_row else "none" for r in items]
    for name, key, color in parts:
        share = np.array([nz(r[key]) for r in items]) * known
        a.bar(x, share, bottom=bottom, color=color, label=name, edgecolor=edge)
        bottom += share
    a.bar(x, unknown, bottom=bottom, color="#e6e6e6", hatch="//", label="unknown",
          edgecolor=edge)
    a.set_ylim(0, 1)
    a.set_ylabel("share of all pixels")
    a.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    a.grid(axis="y", alpha=0.3)
    typ = np.array([r["C_typical"] if r["C_typical"] is not None else np.nan for r in items],
                   dtype=float)
    lo = np.array([nz(r["C_low"]) for r in items])
    hi = np.array([nz(r["C_high"]) for r in items])
    err = np.vstack([np.nan_to_num(typ - lo), np.nan_to_num(hi - typ)])
    colors = ["#c0392b" if r is all_row else "#1f77b4" for r in items]
    b.bar(x, np.nan_to_num(typ), yerr=err, color=colors, capsize=3, alpha=0.85,
          error_kw={"elinewidth": 1})
    b.set_ylim(0, 1)
    b.set_ylabel("runoff coefficient C\n(typical, bar: low-high)")
    b.grid(axis="y", alpha=0.3)
    every = max(1, n // 40)  # keep labels legible for large folders
    ticks = [*range(0, n - 1, every), n - 1]
    b.set_xticks(ticks, [labels[i] for i in ticks], rotation=60, ha="right", fontsize=8)
    a.axvline(n - 1.5, color="black", lw=0.8, ls=":")
    b.axvline(n - 1.5, color="black", lw=0.8, ls=":")
    if n <= 30:  # values on the bars while they stay legible
        for xi, v in zip(x, typ):
            if v == v and v > 0.08:  # inside the bar's foot: clear of the range bars
                b.text(xi, 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=7,
                       color="white")

    def pct(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{v:.0%}"

    def num(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{v:.2f}"

    fig.suptitle(
        "Surface shares and Rational-Method runoff coefficient C per image\n"
        f"ALL (area-weighted, {all_row.get('images', n - 1)} images): C typical "
        f"{num(all_row['C_typical'])} (low-high {num(all_row['C_low'])}-"
        f"{num(all_row['C_high'])})\nimpervious {pct(all_row['impervious_fraction'])} of "
        f"classified ground, unknown {pct(all_row['unknown_fraction'])} of pixels"
        + (f"; {title_note}" if title_note else ""),
        fontsize=10)
    fig.tight_layout()
    save_figure_atomic(fig, path)
