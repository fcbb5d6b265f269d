"""The largest per-GPU batch that fits: a short memory probe for the GPU workload.

    python -m segcore.train.probe --widths 64,128,256,512,1024 --image-size 512 \
        --precision bf16 --headroom 0.2          # prints one JSON object

The batch doubles from 1 while two training steps (forward, backward, AdamW step, the
precision's autocast, channels-last) stay within ``(1 - headroom)`` of the device's
memory, then one bisection between the last that fit and the first that did not. Run it
in a process of its own (the sweep does): the allocator's cache stays with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable


def largest_fitting(measure: Callable[[int], float | None], budget: float, start: int = 1,
                    limit: int = 4096) -> tuple[int, float]:
    """(largest batch whose measured peak stays within ``budget``, that peak).

    Args:
        measure: batch -> peak bytes of a training step at that batch, or ``None`` when
            it ran out of memory.
        budget: the bytes a batch may use.
        start: the first batch tried (it must fit).
        limit: the largest batch tried.

    Raises:
        ValueError: ``start`` does not fit.
    """
    peak = measure(start)
    if peak is None or peak > budget:
        raise ValueError(f"batch {start} does not fit in {budget / 2**20:.0f} MiB "
                         f"(peak {'out of memory' if peak is None else f'{peak / 2**20:.0f} MiB'})")
    good, good_peak, bad = start, peak, None
    while good * 2 <= limit:
        p = measure(good * 2)
        if p is None or p > budget:
            bad = good * 2
            break
        good, good_peak = good * 2, p
    if bad is not None and bad - good > 1:  # one bisection step: most of the gap
        mid = (good + bad) // 2
        p = measure(mid)
        if p is not None and p <= budget:
            good, good_peak = mid, p
    return good, good_peak


def probe_batch(widths: list[int], image_size: int, precision: str = "bf16",
                headroom: float = 0.2, num_classes: int = 6,
                channels_last: bool = True) -> dict:
    """Measure on this process's CUDA device; see the module docstring."""
    import torch

    from segcore.config import ModelConfig
    from segcore.model import build_model
    from segcore.precision import DTYPES

    if not torch.cuda.is_available():
        raise RuntimeError("the batch probe needs a CUDA device")
    dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    budget = (1 - headroom) * total
    model = build_model(ModelConfig(widths=tuple(widths), channels_last=channels_last),
                        num_classes).to(dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = None if precision == "fp32" else DTYPES[precision]

    def measure(b: int) -> float | None:
        try:
            x = torch.randn(b, 3, image_size, image_size, device=dev).to(memory_format=fmt)
            y = torch.randint(0, num_classes, (b, image_size, image_size), device=dev)
            torch.cuda.reset_peak_memory_stats(dev)
            for _ in range(2):
                with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(dev)
            return float(torch.cuda.max_memory_allocated(dev))
        except torch.OutOfMemoryError:
            return None
        finally:
            torch.cuda.empty_cache()

    batch, peak = largest_fitting(measure, budget)
    return {"batch": batch, "peak_mb": peak / 2**20, "device_mb": total / 2**20,
            "headroom": headroom, "device": torch.cuda.get_device_name(dev),
            "precision": precision, "image_size": image_size, "widths": list(widths)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--headroom", type=float, default=0.2)
    a = p.parse_args(argv)
    try:
        out = probe_batch([int(w) for w in a.widths.split(",")], a.image_size, a.precision,
                          a.headroom)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
