"""Train and evaluate one configuration.

    python launch/train.py                                  # defaults: synthetic, six classes
    torchrun --nproc-per-node 2 launch/train.py --engine ddp
    python launch/train.py --data /data/sdd --classes binary --arch paper --depth 3

Writes to --out: result.json (one results row), config.toml, metrics.json, checkpoint.pt,
curves.png, confusion.png, samples.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from segcore.config import (ARCHS, ENGINES, LOADERS, MODES, NORMS, PRECISIONS,  # noqa: E402
                            SCHEMES, ConfigError, DataConfig, ModelConfig, RunConfig,
                            TrainConfig, load_config, widths_for_depth)


def _widths(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--widths {s!r}: expected integers like 16,32,64")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="start from a config.toml written by an earlier run")
    p.add_argument("--data", help="dataset folder, or 'synthetic' (default)")
    p.add_argument("--classes", choices=SCHEMES, help="class scheme (default six)")
    p.add_argument("--arch", choices=ARCHS, help="U-Net style (default modern)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--depth", type=int, help="levels, widths doubling from 16")
    g.add_argument("--widths", type=_widths, help="channels per level, e.g. 16,32,64")
    p.add_argument("--norm", choices=NORMS)
    p.add_argument("--image-size", type=int, help="training crop side (default 128)")
    p.add_argument("--batch-size", type=int, help="images per worker per step (default 8)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps", type=int, help="stop after N optimizer steps")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"))
    p.add_argument("--engine", choices=ENGINES)
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3))
    p.add_argument("--deepspeed-config", help="DeepSpeed JSON merged over the generated one")
    p.add_argument("--loader", choices=LOADERS)
    p.add_argument("--precision", choices=PRECISIONS)
    cl = p.add_mutually_exclusive_group()
    cl.add_argument("--channels-last", dest="channels_last", action="store_true", default=None)
    cl.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    p.add_argument("--loss", choices=("ce", "ce+dice"))
    p.add_argument("--class-weights", action="store_true", default=None)
    p.add_argument("--patience", type=int, help="early-stop patience in epochs (0 = off)")
    p.add_argument("--monitor", choices=("val_loss", "mIoU"))
    p.add_argument("--target-miou", type=float)
    p.add_argument("--strong-scaling", action="store_true", default=None,
                   help="--batch-size is the global batch, split over workers")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--threads", type=int, help="CPU threads per worker (0 = cores/workers)")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    p.add_argument("--synthetic-images", type=int)
    p.add_argument("--strict", action="store_true", default=None)
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout", type=float, dest="timeout_s",
                   help="collective timeout in seconds (a dead peer fails the job)")
    p.add_argument("--run-id")
    p.add_argument("--sweep-id")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--out", help="output folder (default runs/latest)")
    return p


def config_from_args(a: argparse.Namespace) -> RunConfig:
    """Flags over the (optional) --config file over the defaults."""
    base = load_config(a.config).to_dict() if a.config else RunConfig().to_dict()
    m, d, t = base["model"], base["data"], base["train"]
    sets = [
        (m, dict(arch=a.arch, norm=a.norm, channels_last=a.channels_last, compile=a.compile)),
        (d, dict(source=a.data, class_scheme=a.classes, image_size=a.image_size,
                loader=a.loader, augment=a.augment, num_workers=a.num_workers,
                synthetic_images=a.synthetic_images, strict=a.strict)),
        (t, dict(batch_size=a.batch_size, epochs=a.epochs, steps=a.steps,
                warmup_steps=a.warmup_steps, lr=a.lr, optimizer=a.optimizer, engine=a.engine,
                zero_stage=a.zero_stage, deepspeed_config=a.deepspeed_config,
                precision=a.precision, loss=a.loss, class_weights=a.class_weights,
                patience=a.patience, monitor=a.monitor, target_miou=a.target_miou,
                strong_scaling=a.strong_scaling, grad_accum=a.grad_accum,
                threads=a.threads, seed=a.seed, timeout_s=a.timeout_s)),
    ]
    for section, values in sets:
        section.update({k: v for k, v in values.items() if v is not None})
    if a.arch is not None:
        m["kernel"] = 0  # the chosen architecture's default kernel
    if a.arch == "paper" and a.norm is None:
        m["norm"] = "none"
    if a.depth is not None:
        m["widths"] = list(widths_for_depth(a.depth))
    if a.widths is not None:
        m["widths"] = list(a.widths)
    for k, v in (("mode", a.mode), ("out", a.out), ("run_id", a.run_id),
                 ("sweep_id", a.sweep_id)):
        if v is not None:
            base[k] = v
    return RunConfig(model=ModelConfig(**{**m, "widths": tuple(m["widths"])}),
                     data=DataConfig(**d), train=TrainConfig(**t), mode=base["mode"],
                     out=base["out"], run_id=base["run_id"], sweep_id=base["sweep_id"])


@record  # under torchrun: the failing rank and its error reach the agent's report
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" \
        else ""
    try:
        cfg = config_from_args(a)
        from segcore.train.run import run

        run(cfg, log=lambda msg: print(msg, flush=True), resume=a.resume)
    except (ConfigError, FileNotFoundError) as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        from segcore.data.layouts import DatasetError

        if isinstance(e, DatasetError):
            print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
            return 2
        if _is_oom(e):
            print(f"{prefix}error: out of memory: {e}. Lower --batch-size or --image-size, "
                  "or use --precision bf16", file=sys.stderr, flush=True)
            return 3
        print(f"{prefix}error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    return 0


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


if __name__ == "__main__":
    sys.exit(main())
