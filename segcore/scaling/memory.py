"""Bytes per worker: parameters, gradients, optimizer state and activations, per engine.

Model state (``P`` parameters, fp32 weights and gradients, ``k`` optimizer states of
4 bytes each: 2 for Adam/AdamW, 1 for SGD with momentum), per worker at ``p`` workers:

============  =============  =============  ================  =================================
engine        weights        gradients      optimizer         transient
============  =============  =============  ================  =================================
DDP           4P             4P             4kP               (gradients are bucket views)
ZeRO-1        4P             4P             4kP / p           --
ZeRO-2        4P             4P / p         4kP / p           reduce bucket: min(4P, 2 GB)
ZeRO-3        4P / p         4P / p         4kP / p           2 units' weights + 1 unit's grads
FSDP2         4P / p         4P / p         4kP / p           2 units' weights + 1 unit's grads
============  =============  =============  ================  =================================

(DeepSpeed's default ``reduce_bucket_size`` is 5e8 elements; ZeRO-3 / FSDP2 hold the
unit in use and the one prefetched, at the compute dtype, and one unit's unsharded
gradients before its reduce-scatter.) Under bf16 / fp16 DeepSpeed also keeps half-
precision weights and gradients (``2P + 2P``, sharded as the table shards them) and
FSDP2 gathers units in half precision.

Activations are measured, not guessed: one training step of the real model on the
``meta`` device (shapes only, no memory) at the run's image size, counting the bytes of
every tensor the step creates and frees (saved activations, logits, loss temporaries,
the gradients flowing back) and taking the peak (:func:`step_transient_bytes`), at
batch 1 and 2 for a fixed and a per-image part; half that under bf16 / fp16 (every
transient tensor in half precision). The batch's images and masks come on top.

Measured peaks on a CPU host are the process's peak RSS, which includes the Python
runtime, libraries and loaders; when a row has no ``mem_workload_mb`` (the peak above
the run's own baseline) the comparison fits one constant runtime offset and says so.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Mapping, Sequence

from segcore.registry import MEMORY_KIND_LABELS, MEMORY_KINDS as ENGINES
from segcore.registry import memory_kind as engine_kind

GIB = float(1 << 30)
MIB = float(1 << 20)
GPU_SIZES_GB = (24, 40, 80, 141)
USABLE_FRACTION = 0.92  # CUDA context, allocator fragmentation, NCCL buffers
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1}
DS_REDUCE_BUCKET_BYTES = 5e8 * 4  # DeepSpeed reduce_bucket_size default, fp32


def state_bytes(params: int, kind: str, workers: int = 1, optimizer: str = "adamw",
                precision: str = "fp32", largest_unit_params: int = 0) -> dict[str, float]:
    """Model-state bytes per worker (see the module table).

    Returns:
        ``weights``, ``gradients``, ``optimizer``, ``transient`` and ``total``.
    """
    if kind not in ENGINES:
        raise ValueError(f"engine kind {kind!r} is not one of {', '.join(ENGINES)}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer {optimizer!r} is not one of "
                         f"{', '.join(OPTIMIZER_STATES)}")
    p = max(1, int(workers))
    P = float(params)
    k = OPTIMIZER_STATES[optimizer]
    half = precision in ("bf16", "fp16")
    w, g, o = 4 * P, 4 * P, 4 * k * P
    transient = 0.0
    if kind == "zero1":
        o /= p
    elif kind == "zero2":
        g, o = g / p, o / p
        transient = min(4 * P, DS_REDUCE_BUCKET_BYTES)
    elif kind in ("zero3", "fsdp"):
        w, g, o = w / p, g / p, o / p
        unit = float(largest_unit_params or params)
        transient = 2 * unit * (2 if half else 4) + 4 * unit
    if half and kind.startswith("zero"):
        # DeepSpeed's half-precision model copy and gradients, sharded like the fp32 ones.
        shard_w = p if kind == "zero3" else 1
        shard_g = p if kind in ("zero2", "zero3") else 1
        w += 2 * P / shard_w
        g += 2 * P / shard_g
    total = w + g + o + transient
    return {"weights": w, "gradients": g, "optimizer": o, "transient": transient,
            "total": total}


class _LiveBytes:
    """Bytes of the tensors created while active (a dispatch mode), and their peak.

    Every op's outputs are counted once per storage and released when the last tensor
    on that storage dies, so the peak is what a caching-free allocator would hold.
    Autograd runs CPU and meta backward on the calling thread, so backward is counted.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes

    def mode(self):
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        key, n = st._cdata, st.nbytes()
                        if key not in tracker._refs:
                            tracker._refs[key] = 0
                            tracker.live += n
                            tracker.peak = max(tracker.peak, tracker.live)
                        tracker._refs[key] += 1
                        weakref.finalize(t, tracker._free, key, n)
                return out

        return Mode()


def step_transient_bytes(model, input_shape: Sequence[int],
                         loss_fn: Callable | None = None) -> int:
    """Peak bytes of the tensors one training step creates (forward, loss, backward):
    activations saved for backward, the logits and the loss's temporaries, the gradients
    flowing back. Measured on the ``meta`` device (no memory allocated, any size cheap),
    after one untracked step, so that the parameters' gradients already exist as under
    DDP's bucket views and are not counted here (the model state counts them).

    Args:
        loss_fn: ``logits -> scalar``; default cross-entropy against a class map (one
            output channel: binary cross-entropy).
    """
    import copy

    import torch
    import torch.nn.functional as F

    m = copy.deepcopy(model).to("meta").train()
    x = torch.empty(*input_shape, device="meta")

    def default_loss(out):
        if out.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(out, torch.zeros_like(out))
        target = torch.zeros(out.shape[0], *out.shape[2:], dtype=torch.long, device="meta")
        return F.cross_entropy(out, target)

    loss = loss_fn or default_loss
    loss(m(x)).backward()  # gradients now exist
    tracker = _LiveBytes()
    with tracker.mode():
        loss(m(x)).backward()
    return tracker.peak


def activation_model(arch: str, widths: Sequence[int], class_scheme: str,
                     image_size: int) -> tuple[float, float]:
    """``(fixed, per image)`` bytes of a training step's transient memory for a row's
    U-Net at its crop size (fp32): :func:`step_transient_bytes` at batch 1 and 2."""
    from segcore.scaling.comm import unet_for

    key = (arch, tuple(int(w) for w in widths), class_scheme, int(image_size))
    if key not in _ACTIVATIONS:
        model = unet_for(arch, key[1], class_scheme)
        one, two = (step_transient_bytes(model, (b, 3, image_size, image_size))
                    for b in (1, 2))
        _ACTIVATIONS[key] = (float(2 * one - two), float(two - one))
    return _ACTIVATIONS[key]


_ACTIVATIONS: dict[tuple, tuple[float, float]] = {}  # memo: a model's step never changes


def io_bytes(batch: int, image_size: int) -> float:
    """The batch itself: fp32 images and int64 masks."""
    return batch * float(image_size) ** 2 * (3 * 4 + 8)


def predict_peak(params: int, kind: str, workers: int, batch: int,
                 activations: tuple[float, float], image_size: int, optimizer: str = "adamw",
                 precision: str = "fp32", largest_unit_params: int = 0) -> dict[str, float]:
    """Bytes per worker at the peak: model state + the step's transient tensors
    (``activations`` = (fixed, per image), halved under bf16 / fp16) + the batch."""
    st = state_bytes(params, kind, workers, optimizer, precision, largest_unit_params)
    fixed, per_image = activations
    act = (fixed + per_image * batch) * (0.5 if precision in ("bf16", "fp16") else 1.0)
    io = io_bytes(batch, image_size)
    return {**st, "activations": act, "io": io, "peak": st["total"] + act + io}


# --------------------------------------------------------------------------- rows


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _widths(row: Mapping[str, Any]) -> list[int]:
    return [int(v) for v in str(row.get("widths")).replace(",", "-").split("-") if v]


Describe = Callable[[Mapping[str, Any]], dict[str, Any]]


def row_prediction(row: Mapping[str, Any], describe: Describe) -> dict[str, float]:
    """The model's peak for one result row (bytes)."""
    d = describe(row)
    kind = engine_kind(str(row.get("engine")), int(_num(row.get("zero_stage")) or 0))
    size = int(_num(row["image_size"]))
    act = activation_model(str(row.get("arch")), _widths(row), str(row.get("class_scheme")),
                           size)
    unit = max(d["unit_bytes"]) // 4 if d.get("unit_bytes") else 0
    return predict_peak(int(_num(row.get("params")) or d["params"]), kind,
                        int(_num(row["world_size"])), int(_num(row["batch_size"])), act, size,
                        str(row.get("optimizer") or "adamw"), str(row.get("precision")), unit)


def compare_rows(rows: Sequence[Mapping[str, Any]], describe: Describe
                 ) -> tuple[list[dict[str, Any]], float | None]:
    """Predicted against measured peak per row.

    Rows with ``mem_workload_mb`` (the peak above the run's baseline) are compared with
    it directly. Rows with only ``peak_mem_mb`` get one constant offset, the median of
    measured - predicted over those rows, standing for the runtime; it is returned so
    the report can state it.

    Returns:
        (one dict per row with ``pred``, ``predicted_mb``, ``measured_mb``, ``error_pct``,
        ``what``), the fitted offset in MiB or None.
    """
    out = []
    for r in rows:
        if r.get("status", "ok") != "ok":
            continue
        try:
            pred = row_prediction(r, describe)
        except (ValueError, KeyError, TypeError):
            continue  # a row the model cannot describe (unknown engine, no image size)
        workload = _num(r.get("mem_workload_mb"))
        peak = _num(r.get("peak_mem_mb"))
        if math.isfinite(workload):
            out.append({"row": r, "pred": pred, "measured_mb": workload,
                        "what": "peak above baseline"})
        elif math.isfinite(peak):
            out.append({"row": r, "pred": pred, "measured_mb": peak,
                        "what": str(r.get("peak_mem_source") or "peak")})
    raw = [x for x in out if x["what"] != "peak above baseline"]
    offset = statistics.median(x["measured_mb"] - x["pred"]["peak"] / MIB for x in raw) \
        if raw else None
    for x in out:
        add = offset if x["what"] != "peak above baseline" and offset is not None else 0.0
        x["predicted_mb"] = x["pred"]["peak"] / MIB + add
        x["error_pct"] = (x["predicted_mb"] / x["measured_mb"] - 1) * 100
    return out, offset


# --------------------------------------------------------------------------- capacity


def max_batch(params: int, kind: str, workers: int, activations: tuple[float, float],
              image_size: int, gpu_gb: float, optimizer: str = "adamw",
              precision: str = "bf16", largest_unit_params: int = 0) -> int:
    """The largest per-worker batch whose predicted peak fits ``gpu_gb`` (GB = 1e9 bytes,
    as GPUs are sold) x :data:`USABLE_FRACTION`; 0 when not even one image fits."""
    budget = gpu_gb * 1e9 * USABLE_FRACTION

    def peak(b: int) -> float:
        return predict_peak(params, kind, workers, b, activations, image_size, optimizer,
                            precision, largest_unit_params)["peak"]

    if peak(1) > budget:
        return 0
    per = peak(2) - peak(1)
    return int(1 + (budget - peak(1)) // per) if per > 0 else 10 ** 9


def _unet(base: int, depth: int, class_scheme: str, image_size: int, arch: str = "modern"):
    from segcore.scaling.comm import describe_unet

    widths = [base * 2 ** i for i in range(depth)]
    d = describe_unet(arch, widths, class_scheme, buckets=False)
    return widths, d, activation_model(arch, widths, class_scheme, image_size)


def capacity_table(image_size: int = 512, workers: int = 8, precision: str = "bf16",
                   optimizer: str = "adamw", class_scheme: str = "six",
                   models: Sequence[tuple[int, int]] = ((16, 4), (16, 6), (32, 5), (64, 5),
                                                        (128, 6)),
                   kinds: Sequence[str] = ("ddp", "zero2", "fsdp"),
                   gpu_sizes: Sequence[float] = GPU_SIZES_GB) -> list[dict[str, Any]]:
    """Largest per-GPU batch the model predicts for U-Nets given as (base width, depth)
    (widths doubling from the base), per engine and GPU size."""
    rows = []
    for base, depth in models:
        widths, d, act = _unet(base, depth, class_scheme, image_size)
        unit = max(d["unit_bytes"]) // 4
        rows.append({"widths": "-".join(map(str, widths)), "params": d["params"],
                     "act_mb_per_image": act[1] / MIB,
                     "max_batch": {(k, gb): max_batch(d["params"], k, workers, act,
                                                      image_size, gb, optimizer, precision,
                                                      unit)
                                   for k in kinds for gb in gpu_sizes}})
    return rows


def largest_model(kind: str, batch: int, gpu_gb: float, workers: int = 8,
                  image_size: int = 512, depth: int = 5, precision: str = "bf16",
                  optimizer: str = "adamw", class_scheme: str = "six") -> tuple[int, int]:
    """(base width, parameters) of the widest U-Net of ``depth`` levels (widths doubling
    from the base, the base a power of two from 8) that fits ``batch`` per GPU; (0, 0)
    if none. Activations grow linearly and parameters quadratically with the base, so
    each candidate's step is measured (on the meta device)."""
    best = (0, 0)
    base = 8
    while base <= 4096:
        _, d, act = _unet(base, depth, class_scheme, image_size)
        peak = predict_peak(d["params"], kind, workers, batch, act, image_size, optimizer,
                            precision, max(d["unit_bytes"]) // 4)["peak"]
        if peak > gpu_gb * 1e9 * USABLE_FRACTION:
            break
        best = (base, d["params"])
        base *= 2
    return best


# --------------------------------------------------------------------------- report




def report_section(rows: Sequence[Mapping[str, Any]], describe: Describe | None = None,
                   image_size: int = 512, workers: int = 8) -> str:
    """Markdown: predicted against measured peaks, then the largest batch and model per
    GPU size."""
    from segcore.fmt import markdown_table

    if describe is None:
        from segcore.scaling.model import describe_row as describe
    lines = ["### Memory model", ""]
    cmp_rows, offset = compare_rows(rows, describe)
    if cmp_rows:
        lines.append(markdown_table(
            ["run", "engine", "workers", "batch", "state (MiB)", "step (MiB)",
             "predicted (MiB)", "measured (MiB)", "measured as", "error"],
            [[x["row"].get("run_id"),
              MEMORY_KIND_LABELS[engine_kind(str(x["row"].get("engine")),
                                      int(_num(x["row"].get("zero_stage")) or 0))],
              int(_num(x["row"]["world_size"])), int(_num(x["row"]["batch_size"])),
              f"{x['pred']['total'] / MIB:.1f}", f"{x['pred']['activations'] / MIB:.1f}",
              f"{x['predicted_mb']:.0f}", f"{x['measured_mb']:.0f}", x["what"],
              f"{x['error_pct']:+.0f} %"] for x in cmp_rows],
            ["l", "l", "r", "r", "r", "r", "r", "r", "l", "r"]))
        if offset is not None:
            lines.append(f"Rows measured only as a process peak get one fitted runtime "
                         f"offset of {offset:.0f} MiB (the Python process, libraries and "
                         "loaders, which the model does not describe); the error is what "
                         "remains.")
        if any(str(x["row"].get("device_type")) == "cpu" for x in cmp_rows):
            lines.append("On a CPU host the measured figure is resident memory (RSS): the "
                         "C allocator's caching and fragmentation, oneDNN workspaces, data "
                         "loading and validation forwards on full-size images are in it "
                         "and not in the model, which counts tensor bytes (a GPU "
                         "allocator's peak is the comparable figure).")
        lines.append("")
    kinds = ("ddp", "zero2", "fsdp")
    table = capacity_table(image_size=image_size, workers=workers, kinds=kinds)
    lines += [f"Largest per-GPU batch the model predicts at {image_size}x{image_size}, bf16, "
              f"AdamW, {workers} workers, {USABLE_FRACTION:.0%} of the GPU usable; each cell "
              f"{' / '.join(MEMORY_KIND_LABELS[k] for k in kinds)}:", "",
              markdown_table(["U-Net widths", "params", "step MiB / image (fp32)"]
                             + [f"{gb} GB" for gb in GPU_SIZES_GB],
                             [[r["widths"], f"{r['params'] / 1e6:.1f} M",
                               f"{r['act_mb_per_image']:.0f}"]
                              + [" / ".join(str(r["max_batch"][(k, gb)]) for k in kinds)
                                 for gb in GPU_SIZES_GB] for r in table],
                             ["l", "r", "r"] + ["r"] * len(GPU_SIZES_GB))]
    biggest = [[MEMORY_KIND_LABELS[k]] + [_fmt_largest(largest_model(k, 8, gb, workers, image_size))
                                   for gb in GPU_SIZES_GB] for k in ("ddp", "fsdp")]
    lines += [f"Widest depth-5 U-Net (widths doubling from the base) that fits a batch of 8 "
              f"per GPU at {image_size}x{image_size}, bf16, {workers} workers (base width, "
              "parameters):", "",
              markdown_table(["engine"] + [f"{gb} GB" for gb in GPU_SIZES_GB], biggest,
                             ["l"] + ["r"] * len(GPU_SIZES_GB))]
    return "\n".join(lines)


def _fmt_largest(res: tuple[int, int]) -> str:
    base, params = res
    return "none fits" if base == 0 else f"{base} ({params / 1e6:.0f} M)"
