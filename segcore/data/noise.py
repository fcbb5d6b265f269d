"""Procedural noise for the synthetic scenes: value noise, fractal Brownian motion and a
box blur, vectorised in numpy."""

from __future__ import annotations

import numpy as np

_F32 = np.float32


def value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise (std ~0.6) with features about ``cell`` pixels across."""
    cell = max(float(cell), 1.0)
    gh, gw = int(h / cell) + 3, int(w / cell) + 3
    grid = rng.standard_normal((gh, gw), dtype=_F32)
    oy, ox = rng.random(2) * cell

    def axis(n, off):
        p = (np.arange(n, dtype=_F32) + _F32(off)) / _F32(cell)
        i0 = p.astype(np.int32)
        f = p - i0
        f = f * f * (3 - 2 * f)  # smoothstep: no visible grid lines
        return i0, i0 + 1, f

    y0, y1, fy = axis(h, oy)
    x0, x1, fx = axis(w, ox)
    gx = grid[:, x0] * (1 - fx) + grid[:, x1] * fx  # (gh, w)
    return gx[y0] * (1 - fy)[:, None] + gx[y1] * fy[:, None]


def fbm(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3) -> np.ndarray:
    """Fractal (multi-octave) noise normalised to zero mean and unit std."""
    out = np.zeros((h, w), _F32)
    amp = 1.0
    for _ in range(octaves):
        out += _F32(amp) * value_noise(rng, h, w, cell)
        cell, amp = cell / 2, amp / 2
    out -= out.mean()
    out /= out.std() + 1e-6
    return out


def box_blur(a: np.ndarray, r: int) -> np.ndarray:
    """Separable box blur of radius ``r`` over the first two axes (edges clamped)."""
    if r < 1:
        return a
    for axis in (0, 1):
        n = a.shape[axis]
        pad = [(0, 0)] * a.ndim
        pad[axis] = (r + 1, r)
        c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=_F32)
        hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
        lo = np.take(c, np.arange(0, n), axis=axis)
        a = (hi - lo) / _F32(2 * r + 1)
    return a


