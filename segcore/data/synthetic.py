"""Procedural nadir (top-down) aerial scenes: the suite's default dataset.

:func:`generate_scene` paints one drone's-eye view of a suburban / rural plot together with
its exact per-pixel label mask in the Semantic Drone Dataset's 24-class table
(:data:`segcore.data.classes.SDD_CLASSES`); :func:`write_dataset` writes a set of such
scenes in the dataset's own folder layout so every loader and tool treats it like the real
thing.

Design
------
- **Layers, back to front.** A scene is painted as a stack of layers onto a float RGB
  canvas and a uint8 label canvas at once: textured grass ground, dirt fields (a
  thresholded low-frequency noise field) and dirt trails, gravel patches, water (ponds with
  irregular banks or a river, darker in deep water, with a sandy bank), roads (straight or
  gently curved bands, possibly crossing, with sidewalks, edge lines and centre dashes),
  paved lots with parking stalls, buildings (rotated rectangles aligned with the street
  grid; gable / hip / flat roofs in terracotta, red-brown, slate, charcoal and light grey,
  with facet shading from one sun direction and darker eaves), garden pools with paved
  coping, tree clusters and bushes, then clutter: cars on roads and lots, obstacles
  (tarpaulins, skips, trampolines), people, fences with poles and garden walls. The label
  of a pixel is that of the topmost layer; a shadow never changes a label (the dataset
  labels the surface under a shadow).
- **Camera.** Buildings and trees cast soft shadows along one sun direction; then per-scene
  brightness, contrast, colour temperature and saturation, an occasional cloud shadow, a
  vignette, a slight optical blur and sensor noise are applied to the image only.
- **Learnable but varied.** Each of the six-class targets (``unlabeled, paved-area, dirt,
  grass, roof, water``) has its own colour range and texture (smooth grey asphalt with
  markings, speckled brown ground, mottled green grass, shaded roof facets, dark blue water),
  while the parameters of every object vary per scene. On average paved-area, dirt, roof
  and water each cover roughly a tenth of a scene or more (water is absent from about one
  scene in eight), grass the largest share, and the classes that fold into ``unlabeled``
  (people, fences, obstacles) under one percent.
- **Resolution independent.** Sizes and texture scales are fractions of ``sqrt(H * W)``
  and object counts do not depend on the size, so a 128x128 and a 512x341 scene look
  alike (only sensor noise is per pixel).
- **Fast and deterministic.** Everything is vectorised numpy: full-frame layers use
  coordinate grids, small objects are computed inside their bounding window only; a
  384x256 scene takes a few tens of milliseconds. All randomness comes from
  ``np.random.default_rng(seed)``; the same seed gives identical arrays.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from segcore.data.classes import SDD_NAMES, class_csv_text
from segcore.data.noise import box_blur, fbm, value_noise
from segcore.io import write_bytes_atomic, write_text_atomic

# Bump when the generator's output changes so cached datasets are regenerated.
GENERATOR_VERSION = 1
MARKER = "synthetic.json"
IMAGE_DIR = "original_images"
MASK_DIR = "label_images_semantic"
CSV_NAME = "class_dict_seg.csv"

_L = {n: i for i, n in enumerate(SDD_NAMES)}
UNLABELED, PAVED, DIRT, GRASS, GRAVEL = (_L[n] for n in
                                         ("unlabeled", "paved-area", "dirt", "grass", "gravel"))
WATER, POOL, VEGETATION, ROOF, WALL = (_L[n] for n in
                                       ("water", "pool", "vegetation", "roof", "wall"))
FENCE, FENCE_POLE, PERSON, CAR, TREE, OBSTACLE = (_L[n] for n in (
    "fence", "fence-pole", "person", "car", "tree", "obstacle"))

_F32 = np.float32


# --------------------------------------------------------------------------- canvas

class _Canvas:
    """Image, label mask and the shared noise fields of one scene being painted."""

    def __init__(self, rng: np.random.Generator, h: int, w: int):
        self.rng, self.h, self.w = rng, h, w
        self.d = math.sqrt(h * w)  # the size unit: object sizes are fractions of it
        self.img = np.zeros((h, w, 3), _F32)
        self.mask = np.full((h, w), GRASS, np.uint8)
        self.blocked = np.zeros((h, w), bool)  # roads, water, buildings: no new building
        self.caster = np.zeros((h, w), bool)  # pixels that cast a shadow
        self.low = fbm(rng, h, w, self.d * 0.35)
        self.low2 = fbm(rng, h, w, self.d * 0.2)
        self.mid = fbm(rng, h, w, max(self.d * 0.025, 1.5), octaves=2)
        self.fine = rng.standard_normal((h, w), dtype=_F32)
        sun = rng.uniform(0, 2 * math.pi)
        self.sun = (math.cos(sun), math.sin(sun))  # direction the light comes FROM (x, y)
        self.yy = np.arange(h, dtype=_F32)[:, None] + _F32(0.5)
        self.xx = np.arange(w, dtype=_F32)[None, :] + _F32(0.5)

    def px(self, frac: float) -> float:
        """A size given as a fraction of the scene scale, in pixels."""
        return frac * self.d

    def window(self, cy: float, cx: float, r: float):
        """(slices, local y, local x) of the square window of radius r around (cy, cx)."""
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, self.h)
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, self.w)
        if y0 >= y1 or x0 >= x1:
            return None
        sl = (slice(y0, y1), slice(x0, x1))
        return sl, self.yy[y0:y1] - _F32(cy), self.xx[:, x0:x1] - _F32(cx)

    def texture(self, sl, rgb, low=0.0, mid=0.0, fine=0.0, low2=0.0) -> np.ndarray:
        """A material: base colour modulated by the scene's noise fields, (h, w, 3)."""
        lum = _F32(1.0) + _F32(low) * self.low[sl] + _F32(mid) * self.mid[sl] \
            + _F32(fine) * self.fine[sl]
        col = np.asarray(rgb, _F32) * lum[..., None]
        if low2:
            # a slow hue drift (e.g. yellower / greener grass)
            col = col + _F32(low2) * self.low2[sl][..., None] * np.asarray([1.0, 0.6, -0.6],
                                                                           _F32)
        return col

    def texture_at(self, sl, m, rgb, low=0.0, mid=0.0, fine=0.0) -> np.ndarray:
        """:meth:`texture` at the pixels where boolean ``m`` is true only: (n, 3)."""
        lum = _F32(1.0) + _F32(low) * self.low[sl][m] + _F32(mid) * self.mid[sl][m] \
            + _F32(fine) * self.fine[sl][m]
        return np.asarray(rgb, _F32) * lum[:, None]

    def paint(self, sl, m: np.ndarray, label: int | None, color) -> None:
        """Set label and colour where boolean ``m`` (window-shaped) is true; ``color`` is
        one RGB triple, a window-shaped (h, w, 3) array or the (n, 3) colours of the n
        selected pixels."""
        if label is not None:
            self.mask[sl][m] = label
        color = np.asarray(color, _F32)
        self.img[sl][m] = color[m] if color.ndim == 3 else color

    def free(self, sl, m=None) -> bool:
        b = self.blocked[sl]
        return not (b[m] if m is not None else b).any()


def _rot(yy, xx, ang):
    """Local (along, across) coordinates of a frame rotated by ``ang`` (radians)."""
    c, s = _F32(math.cos(ang)), _F32(math.sin(ang))
    return xx * c + yy * s, -xx * s + yy * c


def _lumpy(rng, theta, amp, k_max=5):
    """Radius multiplier 1 + a few random angular harmonics (an irregular blob outline)."""
    r = np.ones_like(theta)
    for k in range(2, k_max + 1):
        r += _F32(amp * rng.uniform(0.3, 1.0) / k) * np.cos(k * theta + _F32(rng.uniform(0, 6.3)))
    return r


def _jitter(rng, rgb, amount):
    return np.clip(np.asarray(rgb, float) + rng.uniform(-amount, amount, 3), 0, 255)


# --------------------------------------------------------------------------- layers

def _ground(cv: _Canvas) -> None:
    rng = cv.rng
    sl = (slice(None), slice(None))
    grass = _jitter(rng, rng.choice([(78, 118, 52), (92, 128, 58), (66, 104, 50),
                                     (96, 122, 62)]), 8)
    cv.img[:] = cv.texture(sl, grass, low=0.12, mid=0.09, fine=0.05, low2=10)
    # dirt fields: the top share of a low-frequency field
    share = rng.uniform(0.06, 0.24)
    field = cv.low + 0.15 * cv.mid
    thr = np.quantile(field[::4, ::4], 1 - share)
    dirt = _jitter(rng, rng.choice([(150, 124, 86), (136, 110, 76), (164, 138, 100)]), 8)
    # a short soft transition (sparse grass) in the image; the label switches at its middle
    alpha = np.clip((field - _F32(thr)) * _F32(8) + _F32(0.5), 0, 1)[..., None]
    cv.img[:] = cv.img * (1 - alpha) + cv.texture(sl, dirt, low=0.06, mid=0.10, fine=0.07) * alpha
    cv.mask[field > thr] = DIRT
    # dirt trails across the grass
    for _ in range(rng.integers(0, 3)):
        ang = rng.uniform(0, math.pi)
        cy, cx = rng.uniform(0, cv.h), rng.uniform(0, cv.w)
        t, q = _rot(cv.yy - cy, cv.xx - cx, ang)
        q = q + _F32(rng.uniform(-1.5, 1.5) / cv.d) * t * t + _F32(cv.px(0.02)) * cv.low2
        m = np.abs(q) < cv.px(rng.uniform(0.008, 0.016))
        cv.paint(sl, m, DIRT, cv.texture_at(sl, m, dirt * 1.05, mid=0.08, fine=0.08))
    # gravel patches
    for _ in range(rng.choice(3, p=[0.5, 0.35, 0.15])):
        r = cv.px(rng.uniform(0.06, 0.14))
        cy, cx = rng.uniform(0, cv.h), rng.uniform(0, cv.w)
        win = cv.window(cy, cx, r * 1.4)
        if win is None:
            continue
        s, yy, xx = win
        u, v = _rot(yy, xx, rng.uniform(0, math.pi))
        rad = np.sqrt((u / r) ** 2 + (v / (r * rng.uniform(0.5, 0.9))) ** 2)
        m = rad < _lumpy(rng, np.arctan2(v, u), 0.4) + 0.15 * cv.mid[s]
        gravel = _jitter(rng, (150, 138, 118), 10)
        cv.paint(s, m, GRAVEL, cv.texture_at(s, m, gravel, mid=0.05, fine=0.16))


def _water(cv: _Canvas) -> None:
    rng = cv.rng
    kind = rng.choice(["pond", "river", "none"], p=[0.62, 0.26, 0.12])
    deep = _jitter(rng, rng.choice([(24, 50, 92), (30, 62, 100), (22, 58, 80)]), 8)
    shallow = _jitter(rng, rng.choice([(62, 104, 136), (70, 116, 140), (56, 100, 118)]), 10)
    bank = _jitter(rng, (170, 150, 112), 12)
    if kind == "river":
        sl = (slice(None), slice(None))
        ang = rng.uniform(0, math.pi)
        cy, cx = rng.uniform(0.2, 0.8) * cv.h, rng.uniform(0.2, 0.8) * cv.w
        t, q = _rot(cv.yy - cy, cv.xx - cx, ang)
        q = q + _F32(rng.uniform(-2.0, 2.0) / cv.d) * t * t + _F32(cv.px(0.03)) * cv.low2
        half = cv.px(rng.uniform(0.07, 0.13))
        a = np.abs(q) / _F32(half)
        _water_body(cv, sl, a, deep, shallow, bank)
        return
    if kind == "none":
        return
    for _ in range(rng.choice([1, 2], p=[0.7, 0.3])):
        a_ax, b_ax = cv.px(rng.uniform(0.14, 0.30)), cv.px(rng.uniform(0.09, 0.2))
        cy, cx = rng.uniform(0.1, 0.9) * cv.h, rng.uniform(0.1, 0.9) * cv.w
        win = cv.window(cy, cx, a_ax * 1.6)
        if win is None:
            continue
        s, yy, xx = win
        u, v = _rot(yy, xx, rng.uniform(0, math.pi))
        rad = np.sqrt((u / a_ax) ** 2 + (v / b_ax) ** 2)
        rad = rad / _lumpy(rng, np.arctan2(v, u), 0.35)
        _water_body(cv, s, rad, deep, shallow, bank)


def _water_body(cv: _Canvas, sl, rad, deep, shallow, bank) -> None:
    """Water where normalised distance ``rad`` < 1: dark centre, lighter shore, sand bank."""
    rng = cv.rng
    bank_w = rng.uniform(0.04, 0.12)
    m_bank = (rad < 1 + bank_w) & (rad >= 1)
    cv.paint(sl, m_bank, DIRT, cv.texture_at(sl, m_bank, bank, mid=0.06, fine=0.07))
    m = rad < 1
    depth = np.clip(1 - rad, 0, 1)[..., None] ** 0.6
    col = np.asarray(shallow, _F32) * (1 - depth) + np.asarray(deep, _F32) * depth
    col = col * (1 + 0.05 * cv.low2[sl] + 0.02 * cv.fine[sl])[..., None]
    # ripples / sun glint
    glint = np.clip(cv.mid[sl] - 2.0, 0, None)[..., None] * _F32(rng.uniform(0, 40))
    cv.paint(sl, m, WATER, col + glint)
    cv.blocked[sl] |= rad < 1 + bank_w + 0.1


class _Road:
    def __init__(self, cy, cx, ang, curv, half, edge):
        self.cy, self.cx, self.ang, self.curv = cy, cx, ang, curv
        self.half, self.edge = half, edge  # carriageway half-width; with sidewalk

    def point(self, t, q):
        """Image (y, x) of along-coordinate t and signed offset q from the centre line."""
        qq = q - self.curv * t * t
        c, s = math.cos(self.ang), math.sin(self.ang)
        return self.cy + t * s + qq * c, self.cx + t * c - qq * s

    def heading(self, t):
        return self.ang - math.atan(2 * self.curv * t)


def _roads(cv: _Canvas) -> list:
    rng = cv.rng
    sl = (slice(None), slice(None))
    roads = []
    n = rng.choice([1, 2, 3], p=[0.4, 0.45, 0.15])
    grid = rng.uniform(0, math.pi)  # street-grid orientation of this scene
    asphalt = _jitter(rng, rng.choice([(98, 97, 94), (112, 110, 106), (88, 88, 86)]), 5)
    walk = _jitter(rng, (176, 172, 164), 10)
    for i in range(n):
        ang = grid + (math.pi / 2 if i % 2 else 0) + rng.normal(0, 0.08)
        cy, cx = rng.uniform(0.15, 0.85) * cv.h, rng.uniform(0.15, 0.85) * cv.w
        curv = rng.choice([0.0, rng.uniform(-0.9, 0.9) / cv.d], p=[0.6, 0.4])
        half = cv.px(rng.uniform(0.035, 0.06))
        side = cv.px(rng.uniform(0.0, 0.025)) if rng.random() < 0.7 else 0.0
        road = _Road(cy, cx, ang, curv, half, half + side)
        t, q = _rot(cv.yy - cy, cv.xx - cx, ang)
        q = q + _F32(curv) * t * t
        aq = np.abs(q)
        m = aq < half + side
        cv.paint(sl, m, PAVED, cv.texture_at(sl, m, walk, low=0.03, mid=0.03, fine=0.05))
        m = aq < half
        cv.paint(sl, m, PAVED, cv.texture_at(sl, m, asphalt, low=0.06, mid=0.03, fine=0.04))
        lw = max(cv.px(0.004), 0.8)
        paint = _jitter(rng, (225, 225, 215), 10)
        if rng.random() < 0.8:  # centre dashes
            period = cv.px(rng.uniform(0.06, 0.1))
            m = (aq < lw) & (np.mod(t, period) < period * 0.5)
            cv.paint(sl, m, None, paint * 0.95)
        if rng.random() < 0.5:  # edge lines
            m = (aq > half - 3 * lw) & (aq < half - 2 * lw)
            cv.paint(sl, m, None, paint * 0.9)
        cv.blocked |= aq < half + side + cv.px(0.01)
        roads.append(road)
    return roads


def _rect(cv: _Canvas, cy, cx, length, width, ang, margin=0.0):
    """Window and local coords of a rotated rectangle; None when off-image."""
    win = cv.window(cy, cx, 0.5 * math.hypot(length, width) + margin)
    if win is None:
        return None
    s, yy, xx = win
    u, v = _rot(yy, xx, ang)
    m = (np.abs(u) < length / 2) & (np.abs(v) < width / 2)
    return s, u, v, m


def _car(cv: _Canvas, cy, cx, ang) -> None:
    rng = cv.rng
    length, width = cv.px(rng.uniform(0.035, 0.05)), cv.px(rng.uniform(0.016, 0.021))
    r = _rect(cv, cy, cx, length, width, ang)
    if r is None:
        return
    s, u, v, m = r
    body = _jitter(rng, rng.choice([(200, 200, 205), (30, 32, 36), (150, 20, 24), (40, 60, 130),
                                    (120, 122, 126), (230, 230, 228), (70, 90, 70)]), 12)
    col = np.broadcast_to(np.asarray(body, _F32), m.shape + (3,)).copy()
    # windscreen and rear window: dark bands across the car
    au = np.abs(u / (length / 2))
    glass = (au > 0.25) & (au < 0.5) & (np.abs(v) < width * 0.4)
    col[glass] = (40, 45, 52)
    col *= (1 - 0.25 * (np.abs(v) / (width / 2)) ** 4)[..., None]
    cv.paint(s, m, CAR, col)


def _cars(cv: _Canvas, roads: list) -> None:
    rng = cv.rng
    for road in roads:
        span = cv.d
        for _ in range(rng.integers(0, 5)):
            t = rng.uniform(-span, span)
            lane = road.half * 0.5 * rng.choice([-1, 1])
            y, x = road.point(t, lane)
            if 0 <= y < cv.h and 0 <= x < cv.w and cv.mask[int(y), int(x)] == PAVED:
                _car(cv, y, x, road.heading(t))


def _lots(cv: _Canvas, roads: list) -> None:
    rng = cv.rng
    n = rng.choice([0, 1, 2], p=[0.3, 0.5, 0.2])
    placed, tries = 0, 0
    while placed < n and tries < 5 * n:
        tries += 1
        length, width = cv.px(rng.uniform(0.2, 0.36)), cv.px(rng.uniform(0.12, 0.2))
        if roads:
            road = roads[rng.integers(len(roads))]
            t = rng.uniform(-0.5, 0.5) * cv.d
            q = rng.choice([-1, 1]) * (road.edge + width / 2 + cv.px(0.012))
            cy, cx = road.point(t, q)
            ang = road.heading(t)
        else:
            cy, cx, ang = rng.uniform(0, cv.h), rng.uniform(0, cv.w), rng.uniform(0, math.pi)
        r = _rect(cv, cy, cx, length, width, ang)
        if r is None:
            continue
        s, u, v, m = r
        if not m.any() or not cv.free(s, m):
            continue
        base = _jitter(rng, rng.choice([(156, 152, 144), (104, 103, 100), (170, 164, 152)]), 6)
        cv.paint(s, m, PAVED, cv.texture_at(s, m, base, low=0.05, mid=0.04, fine=0.04))
        # parking stalls along both long sides
        stall, lw = cv.px(0.028), max(cv.px(0.003), 0.7)
        depth = width * 0.3
        lines = (np.mod(u, stall) < lw) & (np.abs(v) > width / 2 - depth) & m
        cv.paint(s, lines, None, (220, 220, 214))
        cv.blocked[s] |= m
        placed += 1
        for k in range(int(length / stall)):
            for sgn in (-1, 1):
                if rng.random() < 0.45:
                    uu = -length / 2 + (k + 0.5) * stall
                    vv = sgn * (width / 2 - depth / 2)
                    c, sn = math.cos(ang), math.sin(ang)
                    _car(cv, cy + uu * sn + vv * c, cx + uu * c - vv * sn, ang + math.pi / 2)


# (base colour, weight): terracotta and red-brown tiles, blue-grey slate, charcoal, light
# grey metal. Kept apart from the asphalt / concrete greys and the tan dirt.
_ROOFS = [((178, 82, 58), 3.0), ((148, 62, 50), 2.0), ((72, 80, 96), 2.0), ((42, 44, 52), 1.2),
          ((150, 152, 160), 0.6)]


def _building(cv: _Canvas, cy, cx, length, width, ang) -> bool:
    rng = cv.rng
    r = _rect(cv, cy, cx, length, width, ang, margin=cv.px(0.02))
    if r is None:
        return False
    s, u, v, m = r
    if not m.any() or not cv.free(s, (np.abs(u) < length / 2 + cv.px(0.012))
                                  & (np.abs(v) < width / 2 + cv.px(0.012))):
        return False
    w = np.array([p for _, p in _ROOFS])
    base = _jitter(rng, _ROOFS[rng.choice(len(_ROOFS), p=w / w.sum())][0], 10)
    col = cv.texture(s, base, low=0.03, mid=0.03, fine=0.035)
    kind = rng.choice(["gable", "hip", "flat"], p=[0.45, 0.35, 0.2])
    # facet normals in image (x, y) for shading against the sun direction
    c, sn = math.cos(ang), math.sin(ang)
    across = (-sn, c)  # +v direction
    along = (c, sn)  # +u direction
    sun = cv.sun
    strength = rng.uniform(0.18, 0.3)

    def lit(direction, sign):
        return 1 + strength * sign * (direction[0] * sun[0] + direction[1] * sun[1])

    if kind == "gable":
        shade = np.where(v > 0, _F32(lit(across, 1)), _F32(lit(across, -1)))
        if base[0] > base[2] + 40:  # tiles: fine stripes along the slope
            period = max(cv.px(0.007), 2.0)
            shade = shade * (1 + 0.06 * np.cos(_F32(2 * math.pi / period) * u))
        ridge = np.abs(v) < max(cv.px(0.003), 0.6)
        shade = np.where(ridge, shade * 1.1, shade)
    elif kind == "hip":
        du, dv = length / 2 - np.abs(u), width / 2 - np.abs(v)
        end = du < dv
        shade = np.where(end, np.where(u > 0, _F32(lit(along, 1)), _F32(lit(along, -1))),
                         np.where(v > 0, _F32(lit(across, 1)), _F32(lit(across, -1))))
    else:
        edge = max(cv.px(0.006), 1.0)
        parapet = (np.abs(u) > length / 2 - edge) | (np.abs(v) > width / 2 - edge)
        shade = np.where(parapet, _F32(1.2), _F32(1.0))
    # eaves: a slightly darker rim
    rim = max(cv.px(0.003), 0.7)
    eaves = (np.abs(u) > length / 2 - rim) | (np.abs(v) > width / 2 - rim)
    shade = np.where(eaves, shade * _F32(0.8), shade)
    col *= np.asarray(shade, _F32)[..., None]
    cv.paint(s, m, ROOF, col)
    if kind == "flat":  # rooftop units
        for _ in range(rng.integers(0, 4)):
            uu = rng.uniform(-0.35, 0.35) * length
            vv = rng.uniform(-0.3, 0.3) * width
            bl, bw = cv.px(rng.uniform(0.012, 0.025)), cv.px(rng.uniform(0.01, 0.02))
            box = (np.abs(u - uu) < bl / 2) & (np.abs(v - vv) < bw / 2) & m
            cv.paint(s, box, ROOF, _jitter(rng, (170, 170, 172), 20))
    cv.blocked[s] |= m
    cv.caster[s] |= m
    return True


def _buildings(cv: _Canvas, roads: list) -> list:
    rng = cv.rng
    placed = []
    target = rng.integers(6, 17)
    tries = 0
    while len(placed) < target and tries < target * 6:
        tries += 1
        length = cv.px(rng.uniform(0.1, 0.24))
        width = cv.px(rng.uniform(0.08, 0.14))
        if rng.random() < 0.12:  # an occasional large hall
            length, width = length * 1.8, width * 1.6
        if roads and rng.random() < 0.75:  # a row along a street
            road = roads[rng.integers(len(roads))]
            t = rng.uniform(-0.7, 0.7) * cv.d
            off = road.edge + cv.px(rng.uniform(0.025, 0.06))
            if rng.random() < 0.5:
                length, width = width, length
            q = rng.choice([-1, 1]) * (off + width / 2)
            cy, cx = road.point(t, q)
            ang = road.heading(t) + rng.normal(0, 0.03)
        else:
            cy, cx = rng.uniform(0, cv.h), rng.uniform(0, cv.w)
            ang = rng.uniform(0, math.pi)
        if _building(cv, cy, cx, length, width, ang):
            placed.append((cy, cx, length, width, ang))
    return placed


def _pools(cv: _Canvas, buildings: list) -> None:
    rng = cv.rng
    if not buildings or rng.random() > 0.45:
        return
    for _ in range(rng.choice([1, 2], p=[0.8, 0.2])):
        cy, cx, bl, bw, ang = buildings[rng.integers(len(buildings))]
        length, width = cv.px(rng.uniform(0.06, 0.11)), cv.px(rng.uniform(0.035, 0.06))
        c, sn = math.cos(ang), math.sin(ang)
        vv = rng.choice([-1, 1]) * (bw / 2 + width / 2 + cv.px(0.035))
        py, px_ = cy + vv * c, cx - vv * sn
        coping = cv.px(0.008)
        r = _rect(cv, py, px_, length + 2 * coping, width + 2 * coping, ang)
        if r is None:
            continue
        s, u, v, m = r
        if not m.any() or not cv.free(s, m):
            continue
        cv.paint(s, m, PAVED, cv.texture_at(s, m, (196, 192, 184), mid=0.03, fine=0.04))
        inner = (np.abs(u) < length / 2) & (np.abs(v) < width / 2)
        edge = np.minimum(length / 2 - np.abs(u), width / 2 - np.abs(v)) / (width / 2)
        edge = np.clip(edge, 0, 1)[..., None]
        shallow, deep = np.asarray((120, 210, 228), _F32), np.asarray((40, 150, 196), _F32)
        col = shallow * (1 - edge) + deep * edge
        col = col * (1 + 0.04 * cv.mid[s])[..., None]
        cv.paint(s, inner, POOL, col)
        cv.blocked[s] |= m


def _trees(cv: _Canvas, roads: list) -> None:
    rng = cv.rng
    dark = _jitter(rng, rng.choice([(42, 72, 34), (50, 80, 38), (36, 62, 36)]), 6)
    centres = []
    for _ in range(rng.integers(1, 5)):  # clusters / copses
        cy, cx = rng.uniform(0, cv.h), rng.uniform(0, cv.w)
        spread = cv.px(rng.uniform(0.04, 0.12))
        for _ in range(rng.integers(2, 10)):
            centres.append((cy + rng.normal(0, spread), cx + rng.normal(0, spread)))
    if roads and rng.random() < 0.5:  # an avenue
        road = roads[rng.integers(len(roads))]
        q = rng.choice([-1, 1]) * (road.edge + cv.px(0.02))
        step = cv.px(rng.uniform(0.07, 0.12))
        for t in np.arange(-cv.d, cv.d, step):
            centres.append(road.point(t, q))
    no_tree = np.zeros(256, bool)
    no_tree[[ROOF, WATER, POOL, WALL]] = True
    for cy, cx in centres:
        if not (0 <= cy < cv.h and 0 <= cx < cv.w) or no_tree[cv.mask[int(cy), int(cx)]]:
            continue
        r = cv.px(rng.uniform(0.018, 0.04))
        win = cv.window(cy, cx, r * 1.3)
        if win is None:
            continue
        s, yy, xx = win
        rad = np.sqrt(yy * yy + xx * xx) / _F32(r)
        rad = rad / _lumpy(rng, np.arctan2(yy, xx), 0.5, k_max=7)
        m = (rad < 1) & ~no_tree[cv.mask[s]]
        light = 1 + 0.35 * (xx * cv.sun[0] + yy * cv.sun[1]) / _F32(r)
        lum = light * (1 - 0.25 * rad * rad) * (1 + 0.18 * cv.mid[s] + 0.06 * cv.fine[s])
        cv.paint(s, m, TREE, np.asarray(dark, _F32) * lum[..., None])
        cv.caster[s] |= m
    # low bushes (vegetation): lighter, olive
    olive = _jitter(rng, (96, 118, 52), 10)
    for _ in range(rng.integers(0, 7)):
        cy, cx = rng.uniform(0, cv.h), rng.uniform(0, cv.w)
        if no_tree[cv.mask[int(cy), int(cx)]] or cv.mask[int(cy), int(cx)] == PAVED:
            continue
        r = cv.px(rng.uniform(0.012, 0.03))
        win = cv.window(cy, cx, r * 1.4)
        if win is None:
            continue
        s, yy, xx = win
        u, v = _rot(yy, xx, rng.uniform(0, math.pi))
        rad = np.sqrt((u / r) ** 2 + (v / (r * 0.6)) ** 2) / _lumpy(rng, np.arctan2(v, u), 0.4)
        m = (rad < 1) & ~no_tree[cv.mask[s]] & (cv.mask[s] != PAVED)
        cv.paint(s, m, VEGETATION, cv.texture_at(s, m, olive, mid=0.15, fine=0.08))


def _clutter(cv: _Canvas, roads: list, buildings: list) -> None:
    rng = cv.rng
    ground = (PAVED, DIRT, GRASS, GRAVEL)
    # obstacles: tarpaulins, skips, pallets, trampolines, play equipment
    soft_ground = (DIRT, GRASS, GRAVEL)
    for _ in range(rng.integers(1, 8)):
        cy, cx = rng.uniform(0, cv.h), rng.uniform(0, cv.w)
        if cv.mask[int(cy), int(cx)] not in soft_ground:
            continue
        if rng.random() < 0.3:  # trampoline: dark mat, coloured rim
            r = cv.px(rng.uniform(0.025, 0.04))
            win = cv.window(cy, cx, r)
            if win is None:
                continue
            s, yy, xx = win
            rad = np.sqrt(yy * yy + xx * xx) / _F32(r)
            m = (rad < 1) & np.isin(cv.mask[s], soft_ground)
            rim = np.asarray(_jitter(rng, (40, 90, 190), 30), _F32)
            col = np.where((rad > 0.8)[..., None], rim, np.asarray((34, 34, 38), _F32))
            cv.paint(s, m, OBSTACLE, col)
            cv.caster[s] |= m
            continue
        length, width = cv.px(rng.uniform(0.04, 0.09)), cv.px(rng.uniform(0.025, 0.05))
        r = _rect(cv, cy, cx, length, width, rng.uniform(0, math.pi))
        if r is None:
            continue
        s, u, v, m = r
        m &= np.isin(cv.mask[s], soft_ground)
        base = _jitter(rng, rng.choice([(225, 120, 30), (230, 200, 50), (200, 50, 40),
                                        (190, 60, 150), (236, 150, 70)]), 15)
        stripes = 1 + 0.12 * np.cos(_F32(2 * math.pi / max(cv.px(0.01), 2.0)) * u)
        cv.paint(s, m, OBSTACLE, cv.texture_at(s, m, base, fine=0.05) * stripes[m][:, None])
        cv.caster[s] |= m
    # people: small dots with a darker head, on the ground
    for _ in range(rng.integers(0, 9)):
        cy, cx = rng.uniform(0, cv.h), rng.uniform(0, cv.w)
        if cv.mask[int(cy), int(cx)] not in ground:
            continue
        r = max(cv.px(0.008), 1.0)
        win = cv.window(cy, cx, r * 2)
        if win is None:
            continue
        s, yy, xx = win
        u, v = _rot(yy, xx, rng.uniform(0, math.pi))
        body = (u / r) ** 2 + (v / (r * 0.6)) ** 2 < 1
        cloth = _jitter(rng, rng.choice([(200, 40, 40), (30, 30, 40), (230, 230, 230),
                                         (40, 70, 160), (220, 180, 40)]), 20)
        cv.paint(s, body, PERSON, cloth)
        head = yy * yy + xx * xx < (0.45 * r) ** 2
        cv.paint(s, head & body, PERSON, (60, 45, 35))
    # fences (with poles) along a street or around a garden; occasional garden walls
    for _ in range(rng.choice([0, 1, 2], p=[0.35, 0.45, 0.2])):
        if buildings and rng.random() < 0.6:
            cy, cx, bl, bw, ang = buildings[rng.integers(len(buildings))]
            grow = cv.px(rng.uniform(0.04, 0.08))
            length, width = bl + 2 * grow, bw + 2 * grow
        elif roads:
            road = roads[rng.integers(len(roads))]
            t = rng.uniform(-0.5, 0.5) * cv.d
            cy, cx = road.point(t, rng.choice([-1, 1]) * (road.edge + cv.px(0.012)))
            ang, width = road.heading(t), 0.0
            length = cv.px(rng.uniform(0.15, 0.4 if road.curv == 0 else 0.2))
        else:
            continue
        wall = rng.random() < 0.25
        lw = max(cv.px(0.008 if wall else 0.005), 1.0)
        r = _rect(cv, cy, cx, length + lw, width + lw, ang)
        if r is None:
            continue
        s, u, v, m = r
        ring = m & ~((np.abs(u) < length / 2 - lw / 2) & (np.abs(v) < width / 2 - lw / 2))
        if width > 0 and rng.random() < 0.5:  # a gate gap
            ring &= ~((np.abs(u) < cv.px(0.02)) & (v > 0))
        ring &= np.isin(cv.mask[s], (GRASS, DIRT, GRAVEL, VEGETATION))
        if wall:
            cv.paint(s, ring, WALL, cv.texture_at(s, ring, (188, 182, 172), fine=0.05))
            continue
        cv.paint(s, ring, FENCE, _jitter(rng, rng.choice([(120, 96, 70), (150, 150, 150)]), 10))
        period = cv.px(0.03)
        poles = ring & (np.mod(u + v, period) < lw * 1.2)
        cv.paint(s, poles, FENCE_POLE, (70, 66, 60))


# --------------------------------------------------------------------------- camera

def _shadows(cv: _Canvas) -> None:
    rng = cv.rng
    length = cv.px(rng.uniform(0.015, 0.04))
    dx, dy = -cv.sun[0] * length, -cv.sun[1] * length
    steps = max(2, min(6, int(length / 2)))
    shadow = np.zeros((cv.h, cv.w), _F32)
    for k in range(1, steps + 1):
        oy, ox = int(round(dy * k / steps)), int(round(dx * k / steps))
        src = cv.caster[max(-oy, 0):cv.h - max(oy, 0), max(-ox, 0):cv.w - max(ox, 0)]
        dst = shadow[max(oy, 0):cv.h - max(-oy, 0), max(ox, 0):cv.w - max(-ox, 0)]
        np.maximum(dst, src.astype(_F32), out=dst)
    shadow[cv.caster] = 0
    shadow = box_blur(shadow, max(1, int(cv.px(0.004))))
    dark = rng.uniform(0.4, 0.6)
    cv.img *= (1 - (1 - dark) * shadow)[..., None]


def _camera(cv: _Canvas) -> np.ndarray:
    rng = cv.rng
    img = cv.img
    if rng.random() < 0.35:  # a cloud shadow drifting over the scene
        cloud = np.clip((value_noise(rng, cv.h, cv.w, cv.d * 0.5) - 0.2) * 2, 0, 1)
        img *= (1 - rng.uniform(0.15, 0.35) * cloud)[..., None]
    # brightness, contrast, saturation, colour temperature
    gain = rng.uniform(0.82, 1.15)
    contrast = rng.uniform(0.85, 1.15)
    sat = rng.uniform(0.8, 1.15)
    temp = rng.uniform(-0.07, 0.07)
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * _F32(sat)
    img = (img - 120) * _F32(contrast) + 120
    img *= np.asarray([gain * (1 + temp), gain, gain * (1 - temp)], _F32)
    # vignette
    vig = rng.uniform(0.05, 0.3)
    ry = (cv.yy / cv.h - 0.5) * 2
    rx = (cv.xx / cv.w - 0.5) * 2
    img *= (1 - _F32(vig) * (ry * ry + rx * rx) / 2)[..., None]
    # slight optical blur, then sensor noise
    blur = _F32(rng.uniform(0.2, 0.6))
    soft = img.copy()
    soft[1:-1] = 0.25 * img[:-2] + 0.5 * img[1:-1] + 0.25 * img[2:]
    soft[:, 1:-1] = 0.25 * soft[:, :-2] + 0.5 * soft[:, 1:-1] + 0.25 * soft[:, 2:]
    img = img * (1 - blur) + soft * blur
    sigma = rng.uniform(1.5, 5.0)
    img += rng.standard_normal(img.shape, dtype=_F32) * _F32(sigma)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- public API

def generate_scene(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic nadir aerial scene.

    Args:
        seed: the scene's seed; the same seed always gives identical arrays.
        height, width: image size in pixels (any positive size; below about 32 pixels a
            scene is mostly a crop of one or two objects).

    Returns:
        ``(image, mask)``: RGB uint8 ``(height, width, 3)`` and uint8 ``(height, width)`` of
        source (24-class Semantic Drone Dataset) label indices.
    """
    if height < 1 or width < 1:
        raise ValueError(f"scene size must be positive, got {height}x{width}")
    rng = np.random.default_rng(seed)
    cv = _Canvas(rng, int(height), int(width))
    _ground(cv)
    _water(cv)
    roads = _roads(cv)
    _lots(cv, roads)
    buildings = _buildings(cv, roads)
    _pools(cv, buildings)
    _cars(cv, roads)
    _trees(cv, roads)
    _clutter(cv, roads, buildings)
    _shadows(cv)
    return _camera(cv), cv.mask


def scene_seed(seed: int, index: int) -> int:
    """The seed of scene ``index`` of a dataset written with ``seed``."""
    return seed * 100003 + index


def default_root(n_images: int, height: int, width: int, seed: int) -> Path:
    """Cache folder of a synthetic set: ``$SEGBENCH_CACHE/synthetic/<n>x<h>x<w>-s<seed>``,
    with ``~/.cache/segbench`` when ``SEGBENCH_CACHE`` is unset."""
    base = os.environ.get("SEGBENCH_CACHE")
    base = Path(base).expanduser() if base else Path.home() / ".cache" / "segbench"
    return base / "synthetic" / f"{n_images}x{height}x{width}-s{seed}"


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


_STEM = re.compile(r"^\d{3,}$")


def write_dataset(root, n_images: int = 64, height: int = 256, width: int = 384,
                  seed: int = 0, jpeg_quality: int = 90) -> Path:
    """Write ``n_images`` scenes in the Semantic Drone Dataset's layout under ``root``.

    Writes ``original_images/NNN.jpg``, ``label_images_semantic/NNN.png`` (8-bit indices)
    and ``class_dict_seg.csv``; each file atomically (temp name, then ``os.replace``), then
    the ``synthetic.json`` marker last. When the marker already records the same parameters
    and every file exists, returns at once without writing; otherwise regenerates
    (removing numbered files left over from a larger earlier set).

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root)
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    params = {"generator_version": GENERATOR_VERSION, "n_images": int(n_images),
              "height": int(height), "width": int(width), "seed": int(seed),
              "jpeg_quality": int(jpeg_quality)}
    img_dir, msk_dir = root / IMAGE_DIR, root / MASK_DIR
    stems = [f"{i:03d}" for i in range(n_images)]
    marker = root / MARKER
    try:
        done = json.loads(marker.read_text()) == params
    except (OSError, ValueError):
        done = False
    if done and (root / CSV_NAME).is_file() and all(
            (img_dir / f"{s}.jpg").is_file() and (msk_dir / f"{s}.png").is_file()
            for s in stems):
        return root
    img_dir.mkdir(parents=True, exist_ok=True)
    msk_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # incomplete until written again
    keep = set(stems)
    for folder in (img_dir, msk_dir):
        for p in folder.iterdir():
            if p.is_file() and _STEM.match(p.stem) and p.stem not in keep \
                    and p.suffix.lower() in (".jpg", ".png"):
                p.unlink()
    for i, stem in enumerate(stems):
        image, mask = generate_scene(scene_seed(seed, i), height, width)
        write_bytes_atomic(img_dir / f"{stem}.jpg",
                           _encode(image, "JPEG", quality=int(jpeg_quality)))
        write_bytes_atomic(msk_dir / f"{stem}.png", _encode(mask, "PNG"))
    write_text_atomic(root / CSV_NAME, class_csv_text())
    write_text_atomic(marker, json.dumps(params, indent=2) + "\n")  # last: marks complete
    return root
