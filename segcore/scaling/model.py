"""A calibrated model of data-parallel step time for 1 to 1,024 workers, per engine.

The step of one worker at ``p`` workers is modelled as

    T(p) = C(b) + O(p) + E(p)

- ``C(b)``: the measured 1-worker step without the optimizer (forward, backward, data
  wait, bookkeeping) at the per-worker batch ``b``. Under weak scaling ``b`` is fixed;
  under strong scaling ``b = B / p`` and ``C`` follows ``C(b) = C(b1) (f + (1 - f) b /
  b1)``, with the fixed share ``f`` fitted from 1-worker runs at other batch sizes
  (``f = 0``, time proportional to images, when there are none).
- ``O(p)``: the measured 1-worker optimizer time; divided by ``p`` for engines that
  shard the optimizer state (ZeRO-1/2/3, FSDP2), whole for DDP.
- ``E(p)``: the communication left exposed. Per engine the step sends
  (``comm_times``): DDP all-reduces its gradient buckets during backward; ZeRO-1/2
  reduce-scatter the gradients during backward and all-gather the updated weights after
  the optimizer step; ZeRO-3 / FSDP2 all-gather each unit's weights before its forward
  and again before its backward, and reduce-scatter its gradients. Each collective costs
  the ring alpha-beta time of :mod:`segcore.scaling.comm` on the given interconnect.
  Of the communication that can overlap backward (``V``), a fraction ``h`` is hidden,
  but never more than the backward pass lasts (``2/3`` of forward + backward):
  ``E = max((1 - h) V, V - 2/3 t_fwd_bwd) + A``, where ``A`` (ZeRO-1/2's weight gather
  after the step) is never hidden.

``h`` is fitted to the measured multi-worker runs (least squares on relative error).
:func:`leave_one_out` predicts every measured run from all the others (refitting ``h``
and the 1-worker baseline each time), which is the error the report states.
:func:`segcore.scaling.report.report_section` writes the report's section and ``scaling_model.png``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from segcore.registry import COMM_PATTERNS as PATTERNS, comm_pattern, engine_spec
from segcore.scaling.comm import COLLECTIVES, collective_time

SHARDED_OPTIMIZER = ("zero12", "sharded")
BACKWARD_SHARE = 2.0 / 3.0  # backward ~ 2x forward: its share of forward + backward
WORKERS = tuple(2 ** k for k in range(11))  # 1 .. 1,024
REPORT_WORKERS = (1, 2, 8, 64, 256, 1024)
DEFAULT_HIDDEN = 0.0  # no overlap: what we assume when no measurement constrains h


def engine_label(engine: str, zero_stage: int = 0) -> str:
    """How ``--engines`` writes it (``ddp``, ``deepspeed:2``)."""
    return engine_spec(engine).axis_value(zero_stage)


# --------------------------------------------------------------------------- interconnect


@dataclass(frozen=True)
class Link:
    """Ring alpha-beta parameters: seconds per step and seconds per byte."""

    alpha_s: float
    beta_s_per_byte: float


@dataclass(frozen=True)
class Interconnect:
    """The network the model sends over: one :class:`Link` per collective (a missing
    collective uses ``all_reduce``'s)."""

    name: str
    links: Mapping[str, Link]
    source: str = ""

    def __post_init__(self) -> None:
        if "all_reduce" not in self.links:
            raise ValueError(f"interconnect {self.name!r} needs an all_reduce link")
        for k, link in self.links.items():
            if k not in COLLECTIVES:
                raise ValueError(f"interconnect {self.name!r}: {k!r} is not a collective")
            if link.alpha_s < 0 or link.beta_s_per_byte < 0:
                raise ValueError(f"interconnect {self.name!r}: latency and inverse "
                                 "bandwidth must be >= 0")

    def time(self, collective: str, nbytes: float, workers: int) -> float:
        link = self.links.get(collective) or self.links["all_reduce"]
        return collective_time(collective, nbytes, workers, link.alpha_s,
                               link.beta_s_per_byte)

    @classmethod
    def from_bandwidth(cls, name: str, bandwidth_gbit_s: float, latency_us: float,
                       source: str = "") -> "Interconnect":
        """A network given as per-worker bandwidth (Gbit/s, one direction) and per-step
        latency (us): what a user plans to buy."""
        if bandwidth_gbit_s <= 0 or latency_us < 0:
            raise ValueError(f"interconnect {name!r}: bandwidth must be > 0 Gbit/s and "
                             "latency >= 0 us")
        link = Link(latency_us * 1e-6, 8.0 / (bandwidth_gbit_s * 1e9))
        return cls(name, {"all_reduce": link}, source)

    @classmethod
    def from_commbench(cls, result: Mapping[str, Any]) -> "Interconnect":
        """The fitted links of a ``commbench.json``."""
        if "collectives" not in result:
            raise ValueError("the commbench result has no measurements "
                             f"({result.get('skipped', 'no collectives')})")
        links = {k: Link(c["fit"]["alpha_s"], c["fit"]["beta_s_per_byte"])
                 for k, c in result["collectives"].items()}
        name = (f"measured {result['backend']} ({result['world_size']} workers, "
                f"{result['device']})")
        return cls(name, links, f"commbench {result.get('created', '')}".strip())

    def describe(self) -> str:
        ar = self.links["all_reduce"]
        bw = 8.0 / ar.beta_s_per_byte / 1e9 if ar.beta_s_per_byte > 0 else math.inf
        return f"{self.name}: {bw:.1f} Gbit/s, {ar.alpha_s * 1e6:.1f} us per ring step"


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """One configuration's measured 1-worker step and what its step sends.

    Attributes:
        label: a name for tables.
        params: trainable parameters.
        batch: the per-worker batch of the measured 1-worker step.
        step_s, fwd_bwd_s, optim_s: the measured 1-worker step, its forward+backward and
            its optimizer phase (medians).
        buckets: DDP's gradient buckets (bytes, reduce order).
        units: weight bytes (fp32) per ZeRO-3 / FSDP unit.
        grad_bytes_per_param: 4 for fp32 gradients.
        gather_bytes_per_param: bytes per weight all-gathered (2 under bf16/fp16 FSDP).
        fixed_fraction: the share of ``step_s - optim_s`` that does not scale with the
            batch (strong scaling).
        throughput_ratio: measured images/s over ``batch / step_s`` (gaps between steps).
    """

    label: str
    params: int
    batch: float
    step_s: float
    fwd_bwd_s: float
    optim_s: float
    buckets: tuple[int, ...] = ()
    units: tuple[int, ...] = ()
    grad_bytes_per_param: int = 4
    gather_bytes_per_param: int = 4
    fixed_fraction: float = 0.0
    throughput_ratio: float = 1.0

    @property
    def grad_bytes(self) -> int:
        return self.params * self.grad_bytes_per_param


def uniform_buckets(total_bytes: int, cap: int) -> tuple[int, ...]:
    """``total_bytes`` cut into buckets of ``cap`` (a model known only by its size)."""
    full, rest = divmod(int(total_bytes), int(cap))
    return tuple([cap] * full + ([rest] if rest else []))


def comm_times(w: Workload, pattern: str, workers: int, net: Interconnect
               ) -> tuple[float, float]:
    """(communication that can overlap backward, communication after the step), seconds."""
    p = int(workers)
    if p <= 1 or pattern == "none":
        return 0.0, 0.0
    gather = w.gather_bytes_per_param / 4.0
    grad = w.grad_bytes_per_param / 4.0
    if pattern == "allreduce":
        return sum(net.time("all_reduce", b, p) for b in w.buckets), 0.0
    if pattern == "zero12":
        overlap = sum(net.time("reduce_scatter", b, p) for b in w.buckets)
        return overlap, net.time("all_gather", w.params * w.gather_bytes_per_param, p)
    if pattern == "sharded":
        units = w.units or (w.params * 4,)
        overlap = sum(2 * net.time("all_gather", u * gather, p)
                      + net.time("reduce_scatter", u * grad, p) for u in units)
        return overlap, 0.0
    raise ValueError(f"pattern {pattern!r} is not one of {', '.join(PATTERNS)}")


def step_time(w: Workload, pattern: str, workers: int, net: Interconnect, hidden: float,
              batch: float | None = None) -> dict[str, float]:
    """The modelled step of one worker at ``workers`` workers (seconds).

    Args:
        batch: the per-worker batch (default: the measured one).

    Returns:
        ``step_s``, ``compute_s``, ``optim_s``, ``comm_s`` (all sent),
        ``exposed_s`` (not hidden).
    """
    b = w.batch if batch is None else float(batch)
    if b <= 0:
        raise ValueError(f"per-worker batch {b} must be > 0")
    scale = w.fixed_fraction + (1.0 - w.fixed_fraction) * b / w.batch
    compute = (w.step_s - w.optim_s) * scale
    optim = w.optim_s / workers if pattern in SHARDED_OPTIMIZER else w.optim_s
    overlap, after = comm_times(w, pattern, workers, net)
    backward = BACKWARD_SHARE * w.fwd_bwd_s * scale
    exposed = max((1.0 - hidden) * overlap, overlap - backward) + after
    return {"step_s": compute + optim + exposed, "compute_s": compute, "optim_s": optim,
            "comm_s": overlap + after, "exposed_s": exposed}


def predict(w: Workload, pattern: str, net: Interconnect, hidden: float,
            workers: Sequence[int] = WORKERS, global_batch: float | None = None
            ) -> list[dict[str, float]]:
    """Step time, throughput and efficiency over ``workers``.

    Weak scaling (``global_batch`` None): every worker keeps the measured batch;
    efficiency = T(1) / T(p). Strong scaling: the global batch is split, ``b = B / p``
    (worker counts with less than one image each are left out); efficiency =
    T(1, B) / (p T(p, B / p)).
    """
    out = []
    base_batch = w.batch if global_batch is None else float(global_batch)
    t1 = step_time(w, pattern, 1, net, hidden, base_batch)["step_s"]
    for p in workers:
        b = w.batch if global_batch is None else float(global_batch) / p
        if b < 1:
            continue
        s = step_time(w, pattern, p, net, hidden, b)
        thr = w.throughput_ratio * p * b / s["step_s"]
        eff = t1 / s["step_s"] if global_batch is None else t1 / (p * s["step_s"])
        out.append({"workers": p, "batch": b, **s, "throughput_img_s": thr,
                    "efficiency": eff})
    return out


# --------------------------------------------------------------------------- from rows


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def usable(row: Mapping[str, Any]) -> bool:
    """An ok row with a step time and an engine the model knows."""
    if row.get("status", "ok") != "ok":
        return False
    if not all(math.isfinite(_num(row.get(k))) and _num(row.get(k)) > 0
               for k in ("step_ms_p50", "world_size", "batch_size")):
        return False
    try:
        comm_pattern(str(row.get("engine")), int(_num(row.get("zero_stage")) or 0))
    except (ValueError, KeyError):
        return False
    return True


def _truthy(v: Any) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes")


def family_key(row: Mapping[str, Any]) -> tuple:
    """A configuration without its worker count (and repeat): rows that differ only in
    scale. Under strong scaling the global batch names the family."""
    strong = _truthy(row.get("strong_scaling"))
    batch = ("global", _num(row.get("global_batch_size"))) if strong else \
        ("local", _num(row.get("batch_size")))
    return (str(row.get("engine")), int(_num(row.get("zero_stage")) or 0),
            str(row.get("precision")), str(row.get("arch")), str(row.get("widths")),
            _num(row.get("image_size")), str(row.get("class_scheme")),
            str(row.get("loader")), str(row.get("channels_last")), strong, batch,
            str(row.get("device_name")))


def model_key(row: Mapping[str, Any]) -> tuple:
    """The family without its batch: rows whose compute differs only by batch size."""
    k = family_key(row)
    return k[:10] + k[11:]


def _pattern(row: Mapping[str, Any]) -> str:
    return comm_pattern(str(row["engine"]), int(_num(row.get("zero_stage")) or 0))


Describe = Callable[[Mapping[str, Any]], dict[str, Any]]


def describe_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Buckets and units of the U-Net a row trained (cached per model)."""
    from segcore.scaling.comm import describe_unet

    key = (str(row.get("arch")), str(row.get("widths")), str(row.get("class_scheme")))
    if key not in _DESCRIBED:
        widths = [int(v) for v in key[1].replace(",", "-").split("-") if v]
        n = row.get("num_classes")
        _DESCRIBED[key] = describe_unet(key[0], widths, key[2],
                                        num_classes=int(n) if _num(n) == _num(n) else None)
    return _DESCRIBED[key]


_DESCRIBED: dict[tuple, dict[str, Any]] = {}  # pure memo: a model's layout never changes


def _median(values: Iterable[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return statistics.median(vals) if vals else math.nan


def _throughput_ratio(row: Mapping[str, Any]) -> float:
    thr = _num(row.get("throughput_img_s"))
    ideal = _num(row["world_size"]) * _num(row["batch_size"]) / (_num(row["step_ms_p50"]) / 1e3)
    return thr / ideal if math.isfinite(thr) and ideal > 0 else math.nan


def _gather_bytes(row: Mapping[str, Any]) -> int:
    # FSDP's MixedPrecisionPolicy gathers bf16/fp16 weights; DeepSpeed and DDP keep the
    # gradients and the all-gathered weights in the dtype this module assumes (fp32).
    return 2 if row.get("engine") == "fsdp" and row.get("precision") in ("bf16", "fp16") \
        else 4


def workload_from_rows(base: Sequence[Mapping[str, Any]], describe: Describe = describe_row,
                       fixed_fraction: float = 0.0) -> Workload:
    """The 1-worker workload of a family from its 1-worker rows (medians of repeats)."""
    r0 = base[0]
    d = describe(r0)
    step = _median(_num(r["step_ms_p50"]) / 1e3 for r in base)
    fb = _median(_num(r.get("fwd_bwd_ms_p50")) / 1e3 for r in base)
    opt = _median(_num(r.get("optim_ms_p50")) / 1e3 for r in base)
    if not math.isfinite(opt):
        opt = 0.0  # rows without the phase split: the optimizer is not scaled
    if not math.isfinite(fb):
        fb = step - opt
    ratio = _median(_throughput_ratio(r) for r in base)
    return Workload(label=_label(r0), params=int(_num(r0.get("params")) or d["params"]),
                    batch=_num(r0["batch_size"]), step_s=step, fwd_bwd_s=fb, optim_s=opt,
                    buckets=tuple(d["ddp_buckets"]), units=tuple(d["unit_bytes"]),
                    gather_bytes_per_param=_gather_bytes(r0), fixed_fraction=fixed_fraction,
                    throughput_ratio=ratio if math.isfinite(ratio) else 1.0)


def _label(row: Mapping[str, Any]) -> str:
    strong = " strong" if _truthy(row.get("strong_scaling")) else ""
    batch = (f"B{int(_num(row.get('global_batch_size')))}" if strong
             else f"b{int(_num(row['batch_size']))}")
    return (f"{engine_label(str(row['engine']), int(_num(row.get('zero_stage')) or 0))} "
            f"u{row.get('widths')} {batch} {row.get('precision')}{strong}")


def fixed_fraction_from(rows: Sequence[Mapping[str, Any]], model: tuple, batch: float
                        ) -> float:
    """The share of the (non-optimizer) 1-worker step at ``batch`` that does not grow with
    the batch: a straight line through the 1-worker runs of the same ``model`` (see
    :func:`model_key`) at different batch sizes; 0 without two batch sizes."""
    pts: dict[float, list[float]] = {}
    for r in rows:
        if _num(r["world_size"]) == 1 and model_key(r) == model:
            opt = _num(r.get("optim_ms_p50"))
            pts.setdefault(_num(r["batch_size"]), []).append(
                (_num(r["step_ms_p50"]) - (opt if math.isfinite(opt) else 0.0)) / 1e3)
    if len(pts) < 2:
        return 0.0
    xs = sorted(pts)
    ys = [statistics.median(pts[x]) for x in xs]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    at_b = intercept + slope * batch
    if at_b <= 0 or slope <= 0:
        return 0.0
    return min(1.0, max(0.0, intercept / at_b))


# --------------------------------------------------------------------------- fitting


@dataclass
class HiddenFit:
    """The fitted hidden fraction.

    Attributes:
        value: ``h`` used for predictions.
        points: multi-worker rows it rests on.
        comm_share: the largest modelled communication / measured step over them.
        note: how well the data constrain ``h``.
    """

    value: float
    points: int
    comm_share: float
    note: str


def fit_hidden(points: Sequence[tuple[Workload, str, int, float, float]],
               net: Interconnect) -> HiddenFit:
    """``h`` minimising the squared relative error of the modelled step over ``points``.

    Args:
        points: ``(workload, pattern, workers, per-worker batch, measured step s)`` of
            multi-worker runs.
    """
    pts = [p for p in points if p[2] > 1 and p[1] != "none"]
    if not pts:
        return HiddenFit(DEFAULT_HIDDEN, 0, math.nan,
                         f"no multi-worker run: h = {DEFAULT_HIDDEN:g} (no overlap) assumed")
    share = max(step_time(w, pat, p, net, 0.0, b)["comm_s"] / t for w, pat, p, b, t in pts)

    def loss(h: float) -> float:
        return sum((step_time(w, pat, p, net, h, b)["step_s"] / t - 1.0) ** 2
                   for w, pat, p, b, t in pts)

    grid = [i / 100 for i in range(101)]
    losses = [loss(h) for h in grid]
    best = min(losses)
    # The flattest stretch of the loss: report the middle of the h values within 1 % of
    # the best loss, so a loss that h barely moves does not pick an edge by rounding.
    near = [h for h, v in zip(grid, losses) if v <= best * 1.01 + 1e-12]
    value = statistics.median(near) if max(near) - min(near) > 0.2 else \
        grid[losses.index(best)]
    if share < 0.02:
        note = (f"communication is at most {share * 100:.1f} % of the measured steps: the "
                "data hardly constrain h")
    else:
        note = f"communication is up to {share * 100:.0f} % of the measured steps"
    return HiddenFit(value, len(pts), share, note)


def _points(rows: Sequence[Mapping[str, Any]], workloads: Mapping[tuple, Workload]
            ) -> list[tuple[Workload, str, int, float, float]]:
    out = []
    for r in rows:
        w = workloads.get(family_key(r))
        if w is not None and _num(r["world_size"]) > 1:
            out.append((w, _pattern(r), int(_num(r["world_size"])), _num(r["batch_size"]),
                        _num(r["step_ms_p50"]) / 1e3))
    return out


def _inverted(row: Mapping[str, Any], net: Interconnect, hidden: float,
              describe: Describe) -> Workload:
    """A 1-worker workload estimated from a multi-worker row: its phases less what the
    model says that worker count adds (the exposed communication inside forward +
    backward; a sharded optimizer's shard)."""
    w = workload_from_rows([row], describe)
    p = int(_num(row["world_size"]))
    pat = _pattern(row)
    if pat in SHARDED_OPTIMIZER:
        w = replace(w, optim_s=w.optim_s * p)
    exposed = step_time(w, pat, p, net, hidden)["exposed_s"]
    w = replace(w, fwd_bwd_s=max(w.fwd_bwd_s - exposed, 0.5 * w.fwd_bwd_s))
    extra = step_time(w, pat, p, net, hidden)["step_s"] - step_time(w, pat, 1, net,
                                                                      hidden)["step_s"]
    return replace(w, step_s=w.step_s - extra)


def calibrate(rows: Sequence[Mapping[str, Any]], net: Interconnect,
              describe: Describe = describe_row) -> tuple[dict[tuple, Workload], HiddenFit]:
    """Workloads (from each family's 1-worker rows) and the hidden fraction fitted to
    the multi-worker rows of the families that have a 1-worker baseline."""
    ok = [r for r in rows if usable(r)]
    workloads: dict[tuple, Workload] = {}
    for key in {family_key(r) for r in ok}:
        base = [r for r in ok if family_key(r) == key and _num(r["world_size"]) == 1]
        if base:
            workloads[key] = workload_from_rows(
                base, describe,
                fixed_fraction_from(ok, model_key(base[0]), _num(base[0]["batch_size"])))
    return workloads, fit_hidden(_points(ok, workloads), net)


def leave_one_out(rows: Sequence[Mapping[str, Any]], net: Interconnect,
                  describe: Describe = describe_row) -> list[dict[str, Any]]:
    """Predict every usable row from all the others.

    For each row: drop it, refit ``h`` on the remaining multi-worker rows, take its
    family's 1-worker baseline from the remaining 1-worker rows (or, when none is left,
    from its remaining multi-worker rows by inverting the model), and predict its step
    time and throughput. Rows whose family has no other row are reported without a
    prediction.
    """
    ok = [r for r in rows if usable(r)]
    out = []
    for i, r in enumerate(ok):
        rest = ok[:i] + ok[i + 1:]
        workloads, fit = calibrate(rest, net, describe)
        key = family_key(r)
        mates = [q for q in rest if family_key(q) == key]
        w, basis = workloads.get(key), "1-worker rows"
        if w is None and mates:
            inv = [_inverted(q, net, fit.value, describe) for q in mates]
            w = replace(inv[0], step_s=_median(x.step_s for x in inv),
                        throughput_ratio=_median(x.throughput_ratio for x in inv))
            basis = f"inverted from {len(mates)} multi-worker row(s)"
        res: dict[str, Any] = {"run_id": r.get("run_id"), "label": _label(r),
                               "world_size": int(_num(r["world_size"])),
                               "measured_step_ms": _num(r["step_ms_p50"]),
                               "measured_img_s": _num(r.get("throughput_img_s")),
                               "hidden": fit.value}
        if w is None:
            res.update(basis="no other row of this configuration", predicted_step_ms=None,
                       predicted_img_s=None, step_err_pct=None, img_s_err_pct=None)
        else:
            p = res["world_size"]
            s = step_time(w, _pattern(r), p, net, fit.value, _num(r["batch_size"]))
            pred_ms = s["step_s"] * 1e3
            pred_thr = w.throughput_ratio * p * _num(r["batch_size"]) / s["step_s"]
            res.update(basis=basis, predicted_step_ms=pred_ms, predicted_img_s=pred_thr,
                       step_err_pct=(pred_ms / res["measured_step_ms"] - 1) * 100,
                       img_s_err_pct=(pred_thr / res["measured_img_s"] - 1) * 100
                       if math.isfinite(res["measured_img_s"]) else None)
        out.append(res)
    return out


def loo_summary(loo: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean absolute error (%) of step time and throughput, overall and per worker count."""
    def mae(items, key):
        vals = [abs(x[key]) for x in items if x.get(key) is not None]
        return (sum(vals) / len(vals), len(vals)) if vals else (math.nan, 0)

    out: dict[str, Any] = {"all": {"step": mae(loo, "step_err_pct"),
                                   "img_s": mae(loo, "img_s_err_pct")}}
    for p in sorted({x["world_size"] for x in loo}):
        sub = [x for x in loo if x["world_size"] == p]
        out[p] = {"step": mae(sub, "step_err_pct"), "img_s": mae(sub, "img_s_err_pct")}
    return out


# --------------------------------------------------------------------------- bounds


# The throughput spread between identical runs on one host, where a sweep has no repeats
# to measure it: about 6 % between identical runs on one 2-core host, 6x their
# within-run CI. The report's ties and this model's intervals both use it.
RUN_TO_RUN_PCT = 6.0


@dataclass(frozen=True)
class Bounds:
    """What a prediction interval rests on.

    Attributes:
        hidden: the ``h`` range the data allow: the spread of ``h`` over the
            leave-one-out refits, or all of [0, 1] where the fit hardly constrains it
            (fewer than two multi-worker runs, or communication under 2 % of their steps).
        rel_err_pct: the relative error added on both sides: the leave-one-out throughput
            error and the run-to-run spread, added in quadrature.
        measured_max: the largest worker count measured; predictions beyond it are
            extrapolations by ``p / measured_max``.
        note: how the interval was formed, for the report.
    """

    hidden: tuple[float, float]
    rel_err_pct: float
    measured_max: int
    note: str

    def extrapolation(self, workers: int) -> float:
        """How far ``workers`` lies beyond the measured counts (1: inside them)."""
        return max(1.0, workers / max(self.measured_max, 1))


def bounds(rows: Sequence[Mapping[str, Any]], fit: HiddenFit,
           loo: Sequence[Mapping[str, Any]], run_to_run_pct: float = RUN_TO_RUN_PCT
           ) -> Bounds:
    """The interval of the model's predictions from its fit and the measured noise."""
    ok = [r for r in rows if usable(r)]
    top = max((int(_num(r["world_size"])) for r in ok), default=1)
    hs = [x["hidden"] for x in loo if x.get("hidden") is not None] + [fit.value]
    loose = fit.points < 2 or not (fit.comm_share >= 0.02)
    h = (0.0, 1.0) if loose else (min(hs), max(hs))
    errs = [abs(x["img_s_err_pct"]) for x in loo if x.get("img_s_err_pct") is not None]
    loo_pct = sum(errs) / len(errs) if errs else math.nan
    rel = math.hypot(loo_pct if math.isfinite(loo_pct) else 0.0, run_to_run_pct)
    why_h = ("h anywhere in [0, 1]: the measured runs hardly constrain it" if loose else
             f"h in [{h[0]:.2f}, {h[1]:.2f}] over the leave-one-out refits")
    why_e = (f"\u00b1{rel:.0f} %: leave-one-out error {loo_pct:.1f} % and run-to-run "
             f"spread {run_to_run_pct:g} % in quadrature" if math.isfinite(loo_pct) else
             f"\u00b1{rel:.0f} %: the run-to-run spread alone (no leave-one-out error)")
    return Bounds(h, rel, top, f"{why_h}; {why_e}")


def predict_interval(w: Workload, pattern: str, net: Interconnect, hidden: float, b: Bounds,
                     workers: Sequence[int] = WORKERS, global_batch: float | None = None
                     ) -> list[dict[str, float]]:
    """:func:`predict` with ``efficiency_lo/hi`` and ``throughput_img_s_lo/hi``: the
    prediction at both ends of ``b.hidden`` (more overlap is faster), widened by
    ``b.rel_err_pct``; ``extrapolation`` is ``p`` over the largest measured count."""
    mid = predict(w, pattern, net, hidden, workers, global_batch)
    lo = {x["workers"]: x for x in predict(w, pattern, net, b.hidden[0], workers, global_batch)}
    hi = {x["workers"]: x for x in predict(w, pattern, net, b.hidden[1], workers, global_batch)}
    e = b.rel_err_pct / 100.0
    for x in mid:
        p = x["workers"]
        for k in ("efficiency", "throughput_img_s"):
            x[f"{k}_lo"] = min(lo[p][k], x[k]) * (1.0 - e)
            x[f"{k}_hi"] = max(hi[p][k], x[k]) * (1.0 + e)
        # Noise widens an efficiency downwards, but not past what the model itself allows
        # upwards: above 100 % only where it predicts it (a sharded optimizer), and the
        # 1-worker efficiency is 100 % by definition.
        x["efficiency_hi"] = max(min(x["efficiency_hi"], 1.0), hi[p]["efficiency"], x["efficiency"])
        if p == 1 and global_batch is None:
            x["efficiency_lo"] = x["efficiency_hi"] = x["efficiency"]
        x["extrapolation"] = b.extrapolation(p)
    return mid


def held_out_check(rows: Sequence[Mapping[str, Any]], net: Interconnect,
                   describe: Describe = describe_row) -> dict[str, Any] | None:
    """Fit on every worker count but the largest, predict the largest, and say whether
    the measurement falls inside the interval.

    Returns:
        ``None`` with fewer than three measured worker counts (two points leave nothing
        to hold out from a fit that needs a baseline and a multi-worker count); else
        ``{"held_out": p, "fit_on": [...], "bounds": Bounds, "runs": [{"run_id",
        "measured_img_s", "predicted_img_s", "lo", "hi", "err_pct", "inside"}, ...]}``.
    """
    ok = [r for r in rows if usable(r)]
    counts = sorted({int(_num(r["world_size"])) for r in ok})
    if len(counts) < 3:
        return None
    top = counts[-1]
    train = [r for r in ok if int(_num(r["world_size"])) < top]
    workloads, fit = calibrate(train, net, describe)
    b = bounds(train, fit, leave_one_out(train, net, describe))
    runs = []
    for r in ok:
        w = workloads.get(family_key(r))
        if int(_num(r["world_size"])) != top or w is None or _truthy(r.get("strong_scaling")):
            continue
        x = predict_interval(w, _pattern(r), net, fit.value, b, (top,))[0]
        meas = _num(r.get("throughput_img_s"))
        runs.append({"run_id": r.get("run_id"), "measured_img_s": meas,
                     "predicted_img_s": x["throughput_img_s"],
                     "lo": x["throughput_img_s_lo"], "hi": x["throughput_img_s_hi"],
                     "err_pct": (x["throughput_img_s"] / meas - 1) * 100,
                     "inside": x["throughput_img_s_lo"] <= meas <= x["throughput_img_s_hi"]})
    return {"held_out": top, "fit_on": counts[:-1], "bounds": b, "runs": runs}


def at_step_time(w: Workload, step_ms: float) -> Workload:
    """The workload with its 1-worker step set to ``step_ms`` (its phases scaled alike):
    a what-if at a named step time, e.g. a GPU's, instead of the step measured here."""
    if not step_ms > 0:
        raise ValueError(f"step time {step_ms!r} ms must be > 0")
    k = step_ms / 1e3 / w.step_s
    return replace(w, step_s=w.step_s * k, fwd_bwd_s=w.fwd_bwd_s * k, optim_s=w.optim_s * k)


# --------------------------------------------------------------------------- published


@dataclass(frozen=True)
class Published:
    """A published data-parallel scaling figure and the inputs we run the model on."""

    name: str
    params: int
    batch: int  # per worker
    img_s_1: float  # one worker's throughput
    workers: int
    efficiency: float  # published
    net: Interconnect
    bucket_bytes: int  # fusion buffer / bucket cap
    sources: str
    notes: str = ""
    pattern: str = "allreduce"
    fit_group: str = ""  # rows with the same group calibrate h for one another

    def workload(self) -> Workload:
        step = self.batch / self.img_s_1
        return Workload(self.name, self.params, self.batch, step_s=step, fwd_bwd_s=step,
                        optim_s=0.0, buckets=uniform_buckets(self.params * 4,
                                                             self.bucket_bytes))


HOROVOD_NET = Interconnect.from_bandwidth(
    "25 GbE RoCE, 4 GPUs per server", 25.0, 5.0,
    "Horovod docs/benchmarks: 'RoCE-capable 25 Gbit/s network'; 5 us per ring step is "
    "our assumption")
DGX_A100_NET = Interconnect.from_bandwidth(
    "DGX A100 NVLink 3 / NVSwitch", 240 * 8, 10.0,
    "NVLink 3: 300 GB/s per GPU per direction; 240 GB/s (80 %) is our assumption of what "
    "NCCL reaches")
_TF_P100 = ("TensorFlow performance benchmarks, DGX-1 P100, tf_cnn_benchmarks synthetic "
            "data, batch 64 (tensorflow/docs site/en/r1/guide/performance/benchmarks.md)")
_HOROVOD = "Horovod README / docs/benchmarks (128 servers x 4 Pascal GPUs, 25 Gbit/s RoCE)"
_HOROVOD_128 = "Horovod README, 2017 version (32 servers x 4 Pascal GPUs, 25 Gbit/s RoCE)"
_NNUNET = ("NVIDIA DeepLearningExamples PyTorch/Segmentation/nnUNet README, training "
           "performance on DGX A100 80GB (weak scaling column)")
MIB = 1 << 20

PUBLISHED: tuple[Published, ...] = (
    Published("Horovod Inception V3, 128 GPUs", 23_800_000, 64, 142.0, 128, 0.90,
              HOROVOD_NET, 64 * MIB, f"{_HOROVOD_128}; 1 GPU: {_TF_P100}",
              fit_group="horovod"),
    Published("Horovod ResNet-101, 128 GPUs", 44_500_000, 64, 129.0, 128, 0.90, HOROVOD_NET,
              64 * MIB, f"{_HOROVOD_128}; 1 GPU: interpolated (see notes)",
              "1-GPU P100 rate interpolated by FLOPs between ResNet-50 (219 img/s) and "
              "ResNet-152 (91.8 img/s) of the TF table", fit_group="horovod"),
    Published("Horovod VGG-16, 128 GPUs", 138_400_000, 64, 154.0, 128, 0.79, HOROVOD_NET,
              64 * MIB, f"{_HOROVOD_128}; 1 GPU: {_TF_P100}", fit_group="horovod"),
    Published("Horovod Inception V3, 512 GPUs", 23_800_000, 64, 142.0, 512, 0.90,
              HOROVOD_NET, 64 * MIB, f"{_HOROVOD}; 1 GPU: {_TF_P100}"),
    Published("Horovod ResNet-101, 512 GPUs", 44_500_000, 64, 129.0, 512, 0.90, HOROVOD_NET,
              64 * MIB, f"{_HOROVOD}; 1 GPU: interpolated (see notes)",
              "1-GPU rate interpolated as above"),
    Published("Horovod VGG-16, 512 GPUs", 138_400_000, 64, 154.0, 512, 0.68, HOROVOD_NET,
              64 * MIB, f"{_HOROVOD}; 1 GPU: {_TF_P100}"),
    Published("nnU-Net 3D (BraTS, 128^3, AMP), 8 GPUs", 31_192_868, 2, 6.74, 8,
              51.50 / 6.74 / 8, DGX_A100_NET, 25 * MIB, _NNUNET,
              "31.2 M parameters: MONAI DynUNet with the recipe's filters 32..320, 6 levels, "
              "3x3x3 kernels, 4 input channels (counted from the layer shapes)"),
    Published("nnU-Net 2D (BraTS, 192x160, AMP), 8 GPUs", 20_613_092, 64, 856.34, 8,
              5667.14 / 856.34 / 8, DGX_A100_NET, 25 * MIB, _NNUNET,
              "20.6 M parameters: DynUNet 2D, filters 32..512, 6 levels, 3x3 kernels"),
)


def published_comparison(published: Sequence[Published] = PUBLISHED
                         ) -> tuple[list[dict[str, Any]], float]:
    """Run the model on each published figure's compute and interconnect.

    Each row is predicted with no overlap (h = 0), with all the overlap backward allows
    (h = 1), and with ``h`` fitted to the *other* rows of its fit group (Horovod's 128-GPU
    figures calibrate the 512-GPU predictions; no fit for rows without a group).

    Returns:
        (rows, the h fitted on the whole ``horovod`` group).
    """
    def pts(items):
        return [(x.workload(), x.pattern, x.workers, x.batch, x.batch / x.img_s_1 / x.efficiency)
                for x in items]

    group_fit = fit_hidden(pts([x for x in published if x.fit_group == "horovod"]),
                           HOROVOD_NET).value
    rows = []
    for x in published:
        w = x.workload()
        res = {"name": x.name, "workers": x.workers, "published": x.efficiency,
               "params": x.params, "batch": x.batch, "img_s_1": x.img_s_1,
               "net": x.net.describe(), "sources": x.sources, "notes": x.notes}
        for tag, h in (("h0", 0.0), ("h1", 1.0)):
            res[tag] = predict(w, x.pattern, x.net, h, (x.workers,))[0]["efficiency"]
        res["comm_ms"] = step_time(w, x.pattern, x.workers, x.net, 0.0)["comm_s"] * 1e3
        res["step_ms"] = w.step_s * 1e3
        if x.net is HOROVOD_NET:
            calib = [y for y in published if y.fit_group == "horovod" and y is not x]
            h = fit_hidden(pts(calib), HOROVOD_NET).value
            res["h_fit"] = h
            res["fitted"] = predict(w, x.pattern, x.net, h, (x.workers,))[0]["efficiency"]
        rows.append(res)
    return rows, group_fit


# --------------------------------------------------------------------------- report


WHAT_IF = (
    Interconnect.from_bandwidth("25 GbE", 25.0, 10.0, "what-if"),
    Interconnect.from_bandwidth("InfiniBand NDR 400 Gb/s", 400.0, 5.0, "what-if"),
)

ASSUMPTIONS = (
    "The 1-worker step is measured; everything else is modelled. Compute per worker does "
    "not change with the worker count (no host contention, no stragglers, no change in "
    "kernel efficiency); whatever else costs time at scale shows up as prediction error.",
    "Collectives follow the ring alpha-beta model: all-reduce 2(p-1) alpha + 2(p-1)/p n "
    "beta, all-gather and reduce-scatter (p-1) alpha + (p-1)/p n beta, with alpha and "
    "beta measured (commbench) or given. Real libraries switch to trees and hierarchical "
    "rings at scale, so the latency term at 1,024 workers is an upper bound.",
    "DDP all-reduces its buckets (1 MiB first, 25 MiB after, in gradient-ready order) "
    "during backward; ZeRO-1/2 reduce-scatter the gradients during backward and "
    "all-gather the fp32 weights after the step; ZeRO-3 / FSDP2 all-gather each unit's "
    "weights before forward and again before backward and reduce-scatter its gradients.",
    "A fraction h of the overlappable communication is hidden, never more than the "
    "backward pass (taken as 2/3 of forward + backward); h is fitted to the measured "
    "multi-worker runs by least squares on relative step-time error.",
    "Sharded engines divide the optimizer time by the worker count; DDP does not (so a "
    "sharded engine's efficiency can exceed 100 % where its communication is cheap).",
    "Strong scaling: per-worker compute is affine in the batch, its fixed share fitted "
    "from 1-worker runs at other batch sizes (proportional when there are none).",
    "Throughput = images per step / step time x the measured ratio of throughput to "
    "batch / step p50 (gaps between steps).",
)
