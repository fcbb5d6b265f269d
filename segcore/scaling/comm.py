"""Communication microbenchmark: collective time against message size, and an alpha-beta fit.

What a data-parallel step sends depends on the engine: DDP all-reduces the gradients in
buckets (the first capped at 1 MiB, the rest at 25 MiB, filled in the order gradients
become ready in backward); ZeRO and FSDP reduce-scatter gradients and all-gather weights.
This module

* computes DDP's bucket layout for a model (:func:`ddp_buckets`, from the measured order
  in which a backward pass produces the gradients, which is close to reverse registration
  order but not equal to it in a U-Net, whose skip connections finish early);
* times ``all_reduce``, ``all_gather`` and ``reduce_scatter`` over a grid of message sizes
  plus those bucket sizes, on the backend in use (gloo on CPU, NCCL on GPU), with repeats,
  the median and a distribution-free 95 % interval of the median
  (:func:`run_commbench` inside a process group, :func:`spawn_commbench` from a plain
  process, :func:`commbench_for_sweep` once per sweep);
* fits the alpha-beta model of a ring collective (:func:`fit_alpha_beta`):
  ``all_reduce(n) = 2(p-1) alpha + 2(p-1)/p n beta`` and
  ``all_gather(n) = reduce_scatter(n) = (p-1) alpha + (p-1)/p n beta`` for a message of
  ``n`` bytes (the full, unsharded size) over ``p`` workers.

Times are seconds, sizes bytes. Nothing here prints.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")
# torch.distributed._DEFAULT_FIRST_BUCKET_BYTES and DDP's bucket_cap_mb default (25 MiB).
DDP_FIRST_BUCKET_BYTES = 1 << 20
DDP_BUCKET_BYTES = 25 << 20
KIB = 1 << 10
MIB = 1 << 20
COMMBENCH_FILE = "commbench.json"
COMMBENCH_LOG = "commbench.log"


# --------------------------------------------------------------------------- the ring model


def ring_factors(collective: str, workers: int) -> tuple[float, float]:
    """(latency steps, bandwidth factor) of a ring collective over ``workers``.

    ``time = steps * alpha + factor * n * beta`` for a message of ``n`` bytes (the full
    tensor: the all-reduced buffer, the gathered output, the scattered input).
    """
    _check_collective(collective)
    p = int(workers)
    if p < 1:
        raise ValueError(f"workers = {workers}: a collective needs at least 1 worker")
    if collective == "all_reduce":
        return 2.0 * (p - 1), 2.0 * (p - 1) / p
    return float(p - 1), (p - 1) / p


def collective_time(collective: str, nbytes: float, workers: int, alpha_s: float,
                    beta_s_per_byte: float) -> float:
    """Seconds for one ring collective of ``nbytes`` over ``workers`` (0 for one worker)."""
    steps, factor = ring_factors(collective, workers)
    return steps * alpha_s + factor * float(nbytes) * beta_s_per_byte


def _check_collective(name: str) -> None:
    if name not in COLLECTIVES:
        raise ValueError(f"collective {name!r} is unknown; choose one of: "
                         f"{', '.join(COLLECTIVES)}")


# --------------------------------------------------------------------------- DDP buckets


def bucket_layout(sizes_bytes: Sequence[int], first_cap: int = DDP_FIRST_BUCKET_BYTES,
                  cap: int = DDP_BUCKET_BYTES) -> list[int]:
    """Bytes per bucket, in the order the buckets are reduced.

    DDP's rule (``compute_bucket_assignment_by_size`` in the reducer): walk the gradients
    in the order given, add each to the open bucket, and close the bucket as soon as it
    holds at least its cap (1 MiB for the first bucket, 25 MiB after), so a bucket may
    overshoot its cap by one tensor.

    Args:
        sizes_bytes: gradient bytes per parameter, in gradient-ready order.
        first_cap: the first bucket's cap.
        cap: every later bucket's cap.
    """
    buckets: list[int] = []
    open_bytes, limit = 0, first_cap
    for n in sizes_bytes:
        open_bytes += int(n)
        if open_bytes >= limit:
            buckets.append(open_bytes)
            open_bytes, limit = 0, cap
    if open_bytes:
        buckets.append(open_bytes)
    return buckets


def gradient_ready_order(model, input_shape: Sequence[int]) -> list[int]:
    """Indices (into ``model.parameters()``) in the order one backward pass finishes
    their gradients: the order DDP rebuilds its buckets in after the first iterations.

    One forward/backward of a copy of the model on the ``meta`` device (shapes only: no
    memory, any model size) in eval mode (batch statistics need no second image); the
    caller's model and its gradients are untouched.
    """
    import copy

    import torch

    m = copy.deepcopy(model).to("meta").float().eval()
    params = [p for p in m.parameters() if p.requires_grad]
    order: list[int] = []
    handles = [p.register_post_accumulate_grad_hook(lambda _p, i=i: order.append(i))
               for i, p in enumerate(params)]
    try:
        out = m(torch.empty(*input_shape, device="meta"))
        out.float().sum().backward()
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(params)) if i not in order]
    # Parameters without a gradient (unused in forward) come last, as DDP appends them.
    return order + missing


def ddp_buckets(model, input_shape: Sequence[int], bytes_per_grad: int | None = None,
                first_cap: int = DDP_FIRST_BUCKET_BYTES, cap: int = DDP_BUCKET_BYTES
                ) -> list[int]:
    """DDP's steady-state bucket sizes (bytes, in reduce order) for ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    order = gradient_ready_order(model, input_shape)
    size = [p.numel() * (bytes_per_grad or p.element_size()) for p in params]
    return bucket_layout([size[i] for i in order], first_cap, cap)


def smallest_side(model_cfg) -> int:
    """A small input side every layer of the U-Net accepts (for the gradient-order pass)."""
    from segcore.model import min_paper_side

    if model_cfg.arch == "paper":
        return min_paper_side(model_cfg.depth, model_cfg.kernel)
    return 2 ** (model_cfg.depth - 1) * 2


def unet_for(arch: str, widths: Sequence[int], class_scheme: str,
             num_classes: int | None = None):
    """The U-Net a sweep row describes, on the ``meta`` device (shapes without memory:
    layouts of billion-parameter variants cost nothing).

    ``class_scheme`` is a built-in scheme's name; a class-map scheme (another name) needs
    ``num_classes`` (the row's), or is taken as six classes (the head is 1x1: a class
    more or less changes the bytes sent by a few dozen)."""
    import torch

    from segcore.config import ModelConfig
    from segcore.data.classes import scheme
    from segcore.model import build_model

    try:
        s = scheme(class_scheme)
        n, binary = s.num_classes, s.is_binary
    except (ValueError, KeyError):
        n, binary = int(num_classes or 6), False
    cfg = ModelConfig(arch=arch, widths=tuple(int(w) for w in widths), channels_last=False)
    with torch.device("meta"):
        return build_model(cfg, n, binary=binary)


def describe_unet(arch: str, widths: Sequence[int], class_scheme: str,
                  buckets: bool = True, num_classes: int | None = None) -> dict[str, Any]:
    """What one step of this U-Net sends: parameters, gradient bytes (fp32), DDP buckets
    (skipped when ``buckets`` is False) and the per-unit parameter bytes FSDP2 / ZeRO-3
    gather (:func:`shard_units`)."""
    from segcore.train.engines.fsdp import shard_units

    model = unet_for(arch, widths, class_scheme, num_classes)
    side = smallest_side(model.cfg)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    units = []
    seen: set[int] = set()
    for unit in shard_units(model):
        own = [p for p in unit.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        units.append(sum(p.numel() * 4 for p in own))
    units = [u for u in units if u]
    return {"label": f"{arch} u{'-'.join(map(str, widths))} {class_scheme}",
            "arch": arch, "widths": "-".join(map(str, widths)), "class_scheme": class_scheme,
            "params": params, "grad_bytes": params * 4,
            "ddp_buckets": ddp_buckets(model, (1, 3, side, side)) if buckets else [],
            "unit_bytes": units}


# --------------------------------------------------------------------------- statistics


def median_ci95(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(median, lower, upper, coverage): a distribution-free interval of the median.

    The interval ``[x_(k), x_(n-k+1)]`` of the sorted sample covers the true median with
    probability ``1 - 2 P(Bin(n, 1/2) <= k-1)``; ``k`` is the largest with coverage >=
    0.95. Below 6 samples no such ``k`` exists: the range is returned with its (lower)
    coverage.
    """
    x = sorted(float(v) for v in values)
    n = len(x)
    if n == 0:
        raise ValueError("median_ci95 needs at least one value")
    med = (x[(n - 1) // 2] + x[n // 2]) / 2

    def coverage(k: int) -> float:
        tail = sum(math.comb(n, i) for i in range(k)) / 2.0 ** n
        return 1.0 - 2.0 * tail

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= 0.95:
        k += 1
    return med, x[k - 1], x[n - k], coverage(k)


def fit_alpha_beta(collective: str, workers: int, sizes: Sequence[float],
                   times: Sequence[float]) -> dict[str, float]:
    """Latency ``alpha`` and inverse bandwidth ``beta`` of the ring model, by least squares
    on relative error (weights 1/t^2, so 4 KiB and 32 MiB messages count alike), with both
    constrained to be >= 0.

    Returns:
        ``alpha_s``, ``beta_s_per_byte``, ``bandwidth_gb_s`` (1/beta in GB/s, the bus
        bandwidth in nccl-tests' terms), ``rel_rmse`` of the fit and ``points``.
    """
    if workers < 2:
        raise ValueError("fit_alpha_beta: one worker sends nothing; measure with >= 2")
    n = [float(s) for s in sizes]
    t = [float(v) for v in times]
    if len(n) < 2 or len(set(n)) < 2:
        raise ValueError("fit_alpha_beta needs at least two different message sizes")
    if any(v <= 0 for v in t):
        raise ValueError("fit_alpha_beta: times must be > 0")
    w = [1.0 / v ** 2 for v in t]
    sw = sum(w)
    swn = sum(wi * ni for wi, ni in zip(w, n))
    swnn = sum(wi * ni * ni for wi, ni in zip(w, n))
    swt = sum(wi * ti for wi, ti in zip(w, t))
    swnt = sum(wi * ni * ti for wi, ni, ti in zip(w, n, t))
    det = sw * swnn - swn * swn
    a = (swt * swnn - swn * swnt) / det
    b = (sw * swnt - swn * swt) / det
    if a < 0:
        a, b = 0.0, swnt / swnn
    if b < 0:
        a, b = swt / sw, 0.0
    rel = [((a + b * ni) - ti) / ti for ni, ti in zip(n, t)]
    steps, factor = ring_factors(collective, workers)
    beta = b / factor
    return {"alpha_s": a / steps, "beta_s_per_byte": beta,
            "bandwidth_gb_s": (1.0 / beta / 1e9) if beta > 0 else math.inf,
            "rel_rmse": math.sqrt(sum(r * r for r in rel) / len(rel)), "points": len(n)}


# --------------------------------------------------------------------------- measuring


def default_sizes(max_bytes: int = 32 * MIB, min_bytes: int = 4 * KIB) -> list[int]:
    """Message sizes for the fit: powers of 4 from ``min_bytes`` up to ``max_bytes``."""
    out, s = [], min_bytes
    while s <= max_bytes:
        out.append(s)
        s *= 4
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_collective(collective: str, nbytes: int, repeats: int, warmup: int,
                    device) -> tuple[int, list[float]]:
    """Time one collective (fp32 buffers) on the current process group.

    Every repeat starts together (a barrier), and its time is the slowest rank's: a
    collective is finished when the last rank has its result.

    Returns:
        (the bytes actually sent: ``nbytes`` rounded to whole fp32 elements that split
        over the workers, the per-repeat times in seconds).
    """
    import torch
    import torch.distributed as dist

    _check_collective(collective)
    p = dist.get_world_size()
    numel = max(p, int(nbytes) // 4 // p * p)
    full = torch.ones(numel, device=device)
    part = torch.empty(numel // p, device=device)
    # The *_single names replace *_into_tensor / *_tensor in recent torch releases.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    if collective == "all_reduce":
        def op():
            dist.all_reduce(full)
    elif collective == "all_gather":
        def op():
            gather(full, part)
    else:
        def op():
            scatter(part, full)
    flag = torch.zeros(1, device=device)
    times = []
    for i in range(warmup + repeats):
        dist.all_reduce(flag)  # a barrier on the collective's own stream and backend
        _sync(device)
        t0 = time.perf_counter()
        op()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return numel * 4, slowest.cpu().tolist()


def run_commbench(sizes: Sequence[int] | None = None, bucket_bytes: Iterable[int] = (),
                  collectives: Sequence[str] = COLLECTIVES, repeats: int = 10,
                  warmup: int = 2, device=None) -> dict[str, Any]:
    """Time each collective over ``sizes`` and ``bucket_bytes``; fit alpha and beta.

    Call on every rank of an initialised process group of >= 2 workers. Every rank
    returns the same result.

    Returns:
        ``{"backend", "world_size", "device", "repeats", "collectives": {name: {"points":
        [{"bytes", "kind" (grid | bucket), "median_s", "ci95_lo_s", "ci95_hi_s",
        "ci_coverage", "times_s"}], "fit": fit_alpha_beta(...)}}}``
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("run_commbench needs a process group: start it under torchrun, "
                           "or call spawn_commbench from a plain process")
    p = dist.get_world_size()
    if p < 2:
        raise ValueError("run_commbench: one worker has nothing to communicate; run it "
                         "with 2 or more workers")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats = {repeats}, warmup = {warmup}: need repeats >= 1 and "
                         "warmup >= 0")
    for c in collectives:
        _check_collective(c)
    backend = dist.get_backend()
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                  else torch.device("cpu"))
    grid = list(sizes) if sizes is not None else default_sizes()
    plan = [(int(s), "grid") for s in grid] + [(int(s), "bucket")
                                                for s in sorted(set(bucket_bytes))]
    result: dict[str, Any] = {"backend": backend, "world_size": p,
                              "device": _device_name(device), "repeats": repeats,
                              "warmup": warmup, "collectives": {},
                              # a loaded host widens every interval: say how loaded it was
                              "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg")
                              else None}
    for coll in collectives:
        points = []
        for nbytes, kind in plan:
            sent, times = time_collective(coll, nbytes, repeats, warmup, device)
            med, lo, hi, cov = median_ci95(times)
            points.append({"bytes": sent, "kind": kind, "median_s": med, "ci95_lo_s": lo,
                           "ci95_hi_s": hi, "ci_coverage": cov, "times_s": times})
        fit = fit_alpha_beta(coll, p, [q["bytes"] for q in points],
                             [q["median_s"] for q in points])
        result["collectives"][coll] = {"points": points, "fit": fit}
    return result


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from segcore.host import cpu_model

    return cpu_model()


# A worker's rendezvous and each collective get this long: on loopback the whole
# benchmark takes seconds, so a peer that has not answered by then is not coming.
WORKER_TIMEOUT_S = 30.0


class CommbenchError(RuntimeError):
    """The communication benchmark could not run; the message is one line, and the
    workers' own output (C++ stack traces included) is in the log file it names."""


def _spawn_worker(rank: int, world: int, port: int, backend: str, threads: int,
                  out_path: str, kwargs: dict[str, Any], timeout_s: float,
                  log_path: str | None) -> None:
    # A clean distributed environment: under torchrun (or the DeepSpeed launcher) this
    # process inherited the launcher's rendezvous variables, with which torch would join
    # the launcher's store instead of the one at `port`.
    from segcore.host import scrub_launcher_env

    scrub_launcher_env()
    if log_path:  # the workers' console (C++ warnings and stack traces) goes to the log
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    init: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        init["device_id"] = device
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **init)
    try:
        result = run_commbench(device=device, **kwargs)
        if rank == 0:
            Path(out_path).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    # Done and written: leave without interpreter shutdown, where a gloo worker now and
    # then aborts in a C++ destructor (SIGABRT), which would read as a failed worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[-1] if lines else str(text)


def spawn_commbench(workers: int, timeout_s: float = 180.0, log_path: str | os.PathLike |
                    None = None, worker_timeout_s: float = WORKER_TIMEOUT_S,
                    **kwargs: Any) -> dict[str, Any]:
    """:func:`run_commbench` on ``workers`` fresh local processes (from a plain process,
    or from a process that a launcher started: its rendezvous variables are dropped).

    One GPU per worker with NCCL when there are enough GPUs, else CPU processes with gloo
    (each with cores / workers threads). ``kwargs`` go to :func:`run_commbench`.

    Args:
        timeout_s: the whole benchmark's deadline.
        log_path: the workers' stdout and stderr go here (appended), not to the console.
        worker_timeout_s: each worker's rendezvous and collective timeout.

    Raises:
        CommbenchError: a worker failed (one line: its exception or exit), or the
            benchmark ran past ``timeout_s``.
    """
    import torch
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException, ProcessRaisedException

    from segcore.dist import free_port
    from segcore.host import usable_cores

    if workers < 2:
        raise ValueError(f"--workers {workers}: the benchmark needs at least 2 workers")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = "nccl" if gpus >= workers else "gloo"
    threads = max(1, usable_cores() // workers)
    see_log = f" (workers' output: {log_path})" if log_path else ""
    with tempfile.TemporaryDirectory(prefix="commbench-") as tmp:
        out = os.path.join(tmp, "result.json")
        ctx = mp.start_processes(_spawn_worker, nprocs=workers, join=False,
                                 start_method="spawn",
                                 args=(workers, free_port(), backend, threads, out,
                                       dict(kwargs), min(timeout_s, worker_timeout_s),
                                       None if log_path is None else str(log_path)))
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise CommbenchError(f"the communication benchmark ran past "
                                         f"{timeout_s:.0f} s and was stopped{see_log}")
        except ProcessRaisedException as e:
            # Its message is the worker's whole traceback: the last line names the error,
            # the whole of it goes to the log.
            if log_path:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(e.msg + "\n")
            raise CommbenchError(f"worker {e.error_index}: {_last_line(e.msg)}{see_log}") \
                from None
        except ProcessException as e:  # exited with a code or a signal, no exception
            raise CommbenchError(f"{_last_line(str(e))}{see_log}") from None
        finally:
            # torch logs a warning per worker it terminates after a failure: the one
            # line above says it all.
            spawn_log = logging.getLogger("torch.multiprocessing.spawn")
            level = spawn_log.level
            spawn_log.setLevel(logging.ERROR)
            try:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.terminate()
                        proc.join(5)
            finally:
                spawn_log.setLevel(level)
        return json.loads(Path(out).read_text())


# --------------------------------------------------------------------------- results


def stamp(result: dict[str, Any], models: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """``result`` with the models' layouts and, per model, the measured time of DDP's
    all-reduce (the sum of its buckets' medians) and the time the fit predicts for it."""
    out = dict(result)
    out["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    ar = result["collectives"].get("all_reduce")
    rows = []
    for m in models:
        m = dict(m)
        if ar:
            measured = {q["bytes"]: q["median_s"] for q in ar["points"]}
            p, fit = result["world_size"], ar["fit"]
            m["ddp_allreduce_fit_s"] = sum(
                collective_time("all_reduce", b, p, fit["alpha_s"], fit["beta_s_per_byte"])
                for b in m["ddp_buckets"])
            sent = [_rounded(b, p) for b in m["ddp_buckets"]]
            if all(b in measured for b in sent):
                m["ddp_allreduce_measured_s"] = sum(measured[b] for b in sent)
        rows.append(m)
    out["models"] = rows
    return out


def _rounded(nbytes: int, p: int) -> int:
    return max(p, int(nbytes) // 4 // p * p) * 4


def commbench_for_sweep(out_dir: str | os.PathLike, workers: int,
                        models: Iterable[tuple[str, Sequence[int], str]],
                        repeats: int = 10, timeout_s: float = 180.0) -> Path:
    """Measure the sweep's interconnect once and write ``<out_dir>/commbench.json``.

    Args:
        out_dir: the sweep's results folder.
        workers: processes per node of the sweep's largest job (>= 2; a 1-worker sweep
            sends nothing and gets a file saying so).
        models: ``(arch, widths, class_scheme)`` of every model in the grid; their DDP
            bucket sizes are timed too.
        repeats: timed repeats per size.

    Returns:
        the path written.

    Raises:
        CommbenchError: the benchmark failed; ``commbench.json`` then says why (key
            ``failed``), so the report can, and a resumed sweep measures again.
    """
    from segcore.io import write_json_atomic

    path = Path(out_dir) / COMMBENCH_FILE
    described = [describe_unet(a, w, c) for a, w, c in dict.fromkeys(
        (a, tuple(w), c) for a, w, c in models)]
    if workers < 2:
        write_json_atomic(path, {"skipped": "one worker per node: nothing is communicated",
                                 "models": described})
        return path
    buckets = sorted({b for m in described for b in m["ddp_buckets"]})
    # The fit needs a range around the buckets, not far beyond: it keeps the run short.
    largest = min(64 * MIB, max([4 * MIB] + [2 * b for b in buckets]))
    try:
        result = spawn_commbench(workers, timeout_s=timeout_s, sizes=default_sizes(largest),
                                 bucket_bytes=buckets, repeats=repeats,
                                 log_path=Path(out_dir) / COMMBENCH_LOG)
    except CommbenchError as e:
        write_json_atomic(path, {"failed": str(e), "log": COMMBENCH_LOG,
                                 "models": described})
        raise
    write_json_atomic(path, stamp(result, described))
    return path


def load_commbench(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``commbench.json`` (a folder holding one, or the file): a measurement
    (``collectives``), or why there is none (``skipped``, ``failed``)."""
    p = Path(path)
    if p.is_dir():
        p = p / COMMBENCH_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; measure it with: python "
                                "launch/commbench.py --workers 2 --out <folder>")
    data = json.loads(p.read_text())
    if not {"collectives", "skipped", "failed"} & set(data):
        raise ValueError(f"{p} is not a commbench result (no 'collectives')")
    return data


def summary_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per collective: fit and the median at the largest size (for tables)."""
    rows = []
    for name, c in result.get("collectives", {}).items():
        f = c["fit"]
        big = max(c["points"], key=lambda q: q["bytes"])
        rows.append([name, f"{f['alpha_s'] * 1e6:.1f}", f"{f['bandwidth_gb_s']:.2f}",
                     f"{f['rel_rmse'] * 100:.0f}",
                     f"{big['bytes'] / MIB:.1f} MiB: {big['median_s'] * 1e3:.2f} ms "
                     f"[{big['ci95_lo_s'] * 1e3:.2f}, {big['ci95_hi_s'] * 1e3:.2f}]"])
    return rows


SUMMARY_HEADERS = ("collective", "alpha (us)", "bus bandwidth (GB/s)", "fit error (%)",
                   "largest message: median [95 % CI]")


def plot_commbench(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Time against message size per collective: medians with their 95 % interval, the
    fitted alpha-beta line, and DDP's bucket sizes marked."""
    from matplotlib.figure import Figure

    from segcore.io import save_figure_atomic

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    p = result["world_size"]
    for name, c in result["collectives"].items():
        pts = sorted(c["points"], key=lambda q: q["bytes"])
        x = [q["bytes"] for q in pts]
        y = [q["median_s"] * 1e3 for q in pts]
        err = [[(q["median_s"] - q["ci95_lo_s"]) * 1e3 for q in pts],
               [(q["ci95_hi_s"] - q["median_s"]) * 1e3 for q in pts]]
        line = ax.errorbar(x, y, yerr=err, fmt="o", ms=4, capsize=2, label=name)
        f = c["fit"]
        ax.plot(x, [collective_time(name, b, p, f["alpha_s"], f["beta_s_per_byte"]) * 1e3
                    for b in x], "-", color=line[0].get_color(), lw=1,
                alpha=0.8)
        for q in pts:
            if q["kind"] == "bucket":
                ax.axvline(q["bytes"], color="0.8", lw=0.8, zorder=0)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes); grey lines: DDP bucket sizes")
    ax.set_ylabel("time (ms), median and 95 % CI")
    ax.set_title(f"{result['backend']} collectives, {p} workers on {result['device']}\n"
                 "lines: alpha-beta ring fit", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path)
