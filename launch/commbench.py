"""Communication microbenchmark: collective time against message size, alpha-beta fit.

    python launch/commbench.py --workers 2 --out runs/comm          # starts its own workers
    torchrun --nproc-per-node 2 launch/commbench.py --out runs/comm # under torchrun
    python launch/commbench.py --workers 4 --depths 3,4,5 --classes binary --out runs/comm

Times all_reduce, all_gather and reduce_scatter on the backend in use (gloo on CPU, NCCL
with one GPU per worker) over powers of 4 from 4 KiB and over the bucket sizes DDP uses
for the given U-Nets; each size is repeated (median and 95 % interval of the median), and
the ring model's latency alpha and bandwidth 1/beta are fitted per collective. Writes
<out>/commbench.json and <out>/commbench.png, and prints the fit. Exit status: 0 done,
2 bad arguments, 1 the benchmark failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.sweep import int_list  # noqa: E402  (one parser of "3,4" lists for both CLIs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for commbench.json and .png")
    p.add_argument("--workers", type=int, default=2,
                   help="processes to start without torchrun (default 2; ignored under "
                        "torchrun)")
    p.add_argument("--arch", choices=("paper", "modern"), default="modern")
    p.add_argument("--depths", type=int_list("--depths"), default=[3, 4],
                   help="U-Net depths whose DDP buckets are timed (widths doubling from "
                        "16; default 3,4, the sweep's default grid)")
    p.add_argument("--classes", choices=("binary", "six", "full"), default="six")
    p.add_argument("--sizes", type=int_list("--sizes"),
                   help="message sizes in bytes (default: 4 KiB x 4^k up to 32 MiB)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per size")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds before the workers are stopped (plain python only)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.repeats < 1:
        print(f"error: --repeats {a.repeats}: need at least 1", file=sys.stderr)
        return 2
    from segcore.config import ConfigError, widths_for_depth
    from segcore.scaling import comm

    try:
        models = [comm.describe_unet(a.arch, widths_for_depth(d), a.classes)
                  for d in a.depths]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kwargs = {"sizes": a.sizes or comm.default_sizes(),
              "bucket_bytes": sorted({b for m in models for b in m["ddp_buckets"]}),
              "repeats": a.repeats}
    under_torchrun = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    try:
        if under_torchrun:
            from segcore.dist import init_distributed, teardown

            ctx = init_distributed()
            try:
                result = comm.run_commbench(device=ctx.device, **kwargs)
            finally:
                teardown()
            if not ctx.is_primary:
                return 0
        else:
            if a.workers < 2:
                print(f"error: --workers {a.workers}: the benchmark needs at least 2",
                      file=sys.stderr)
                return 2
            result = comm.spawn_commbench(a.workers, timeout_s=a.timeout, **kwargs)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from segcore.io import write_json_atomic
    from segcore.results.report import markdown_table

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = comm.stamp(result, models)
    write_json_atomic(out / comm.COMMBENCH_FILE, result)
    comm.plot_commbench(result, out / "commbench.png")
    print(f"{result['backend']}, {result['world_size']} workers on {result['device']}, "
          f"{a.repeats} repeats per size")
    print(markdown_table(comm.SUMMARY_HEADERS, comm.summary_rows(result),
                         ["l", "r", "r", "r", "l"]), end="")
    for m in result["models"]:
        measured = m.get("ddp_allreduce_measured_s")
        print(f"{m['label']}: {m['params']:,} params, DDP buckets "
              f"{[round(b / 2 ** 20, 2) for b in m['ddp_buckets']]} MiB, all-reduce "
              + (f"{measured * 1e3:.2f} ms measured, " if measured is not None else "")
              + f"{m['ddp_allreduce_fit_s'] * 1e3:.2f} ms by the fit")
    print(f"wrote {out / comm.COMMBENCH_FILE} and {out / 'commbench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
