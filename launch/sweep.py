"""Sweep worker count, batch size, depth, engine, loader and precision; record speedup,
memory and accuracy per configuration, then draw plots and a report.

    python launch/sweep.py --gpus 1,2                       # the default grid
    torchrun launch/sweep.py --gpus 1,2,4 --engines ddp,deepspeed:2 --precisions bf16,fp32
    python launch/sweep.py --preset paper --gpus 1 --data /data/sdd
    srun python launch/sweep.py --nnodes 2 --rdzv-endpoint node0:29500 --gpus 4  # per node

On a host without GPUs, --gpus N means N CPU worker processes (gloo), each with
cores / max(--gpus) threads, and the output and report say so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segcore.config import ConfigError  # noqa: E402


def _ints(flag: str):
    def parse(s: str) -> list[int]:
        try:
            vals = [int(v) for v in s.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {s!r}: expected integers like 1,2,4")
        if not vals or min(vals) < 1:
            raise argparse.ArgumentTypeError(f"{flag} {s!r}: values must be >= 1")
        return vals
    return parse


def _strs(choices: tuple[str, ...] | None, flag: str):
    def parse(s: str) -> list[str]:
        vals = [v.strip() for v in s.split(",") if v.strip()]
        bad = [v for v in vals if choices and v not in choices]
        if bad or not vals:
            raise argparse.ArgumentTypeError(
                f"{flag} {s!r}: choose from {', '.join(choices or ())}")
        return vals
    return parse


def _bools(s: str) -> list[bool]:
    table = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
    try:
        return [table[v.strip().lower()] for v in s.split(",") if v.strip()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"--channels-last {s!r}: use on, off or on,off")


def default_workers() -> list[int]:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 2
    return [w for w in (1, 2, 4, 8, 16) if w <= max(1, n)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=_ints("--gpus"),
                   help="worker counts per node (GPUs, or CPU processes without GPUs); "
                        "default: 1,2,4.. up to the GPUs present, 1,2 on CPU")
    p.add_argument("--batch-sizes", type=_ints("--batch-sizes"), default=[4, 8],
                   help="per-worker batch sizes (default 4,8)")
    p.add_argument("--depths", type=_ints("--depths"), default=[3, 4],
                   help="U-Net depths, widths doubling from 16 (default 3,4)")
    p.add_argument("--engines", type=_strs(None, "--engines"), default=["ddp"],
                   help="ddp, single, deepspeed:0..3 (default ddp)")
    p.add_argument("--loaders", type=_strs(("torch", "dali", "synthetic"), "--loaders"),
                   default=["torch"])
    p.add_argument("--precisions", type=_strs(("fp32", "bf16", "fp16"), "--precisions"),
                   default=["fp32"])
    p.add_argument("--channels-last", type=_bools, default=[True],
                   help="on, off or on,off (default on)")
    p.add_argument("--data", default="synthetic", help="dataset folder or 'synthetic'")
    p.add_argument("--classes", choices=("binary", "six", "full"), default="six")
    p.add_argument("--arch", choices=("paper", "modern"), default="modern")
    p.add_argument("--mode", choices=("throughput", "accuracy", "both"), default="both")
    p.add_argument("--preset", help="a named grid: paper (the reference study), smoke")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="epochs per configuration")
    p.add_argument("--steps", type=int, help="stop each job after N optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--lr", type=float)
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (spread)")
    p.add_argument("--strong-scaling", action="store_true",
                   help="keep the global batch fixed (default: weak scaling)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per worker (default: cores / max(--gpus))")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--rdzv-endpoint", help="HOST:PORT of the first node (multi-node)")
    p.add_argument("--node-rank", type=int,
                   help="this node's rank (default: SLURM_NODEID / GROUP_RANK / 0)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    p.add_argument("--out", help="results folder (default runs/sweeps/<sweep-id>)")
    p.add_argument("--sweep-id")
    p.add_argument("--resume", action="store_true", help="skip recorded configurations")
    p.add_argument("--dry-run", action="store_true", help="print each job's command only")
    p.add_argument("--train-arg", action="append", default=[], metavar="FLAG=VALUE",
                   help="extra launch/train.py flag for every job, e.g. --train-arg "
                        "--synthetic-images=40")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    # Under `torchrun launch/sweep.py` only one process per node drives the sweep.
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return 0
    try:
        import torch

        from segcore.host import capture_env, hardware_tag
        from segcore.sweep.driver import SweepSpec, preset, run_sweep

        workers = a.gpus or default_workers()
        cpu = not torch.cuda.is_available()
        threads = a.threads
        if cpu and not threads:
            from segcore.host import usable_cores

            cores = usable_cores()
            threads = max(1, cores // max(workers))
        extra = []
        for item in a.train_arg:
            k, _, v = item.partition("=")
            extra.append((k, v))
        spec = SweepSpec(workers=workers, batch_sizes=a.batch_sizes, depths=a.depths,
                         engines=a.engines, loaders=a.loaders, precisions=a.precisions,
                         channels_last=a.channels_last, data=a.data, classes=a.classes,
                         arch=a.arch, mode=a.mode, image_size=a.image_size,
                         epochs=a.epochs, steps=a.steps, warmup_steps=a.warmup_steps,
                         lr=a.lr, repeats=a.repeats, strong_scaling=a.strong_scaling,
                         threads=threads, nnodes=a.nnodes, rdzv_endpoint=a.rdzv_endpoint,
                         timeout_s=a.timeout, extra=extra)
        if a.preset:
            p = preset(a.preset)
            spec.preset_rows = p["rows"]
            spec.arch = p.get("arch", spec.arch)
            spec.image_size = p.get("image_size", spec.image_size)
            spec.epochs = p.get("epochs", spec.epochs)
        node_rank = a.node_rank
        if node_rank is None:
            node_rank = int(os.environ.get("SLURM_NODEID", os.environ.get("GROUP_RANK", "0")))
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        sweep_id = a.sweep_id or f"{hardware_tag(capture_env([]))}-{stamp}"
        out = Path(a.out or Path("runs") / "sweeps" / sweep_id)
        if cpu:
            print(f"no GPU: each worker is a CPU process with {threads} thread(s) (gloo). "
                  "CPU timings show code paths and relative effects, not GPU performance.",
                  flush=True)
        run_sweep(spec, out, sweep_id, resume=a.resume, dry_run=a.dry_run,
                  is_writer=node_rank == 0, log=lambda m: print(m, flush=True),
                  argv=sys.argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rows already recorded are kept; re-run with --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
