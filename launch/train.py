"""Train and evaluate one configuration.

    python launch/train.py                                  # defaults: synthetic, six classes
    torchrun --nproc-per-node 2 launch/train.py --engine ddp
    python launch/train.py --data /data/sdd --classes binary --arch paper --depth 3

Writes to --out: result.json (one results row), config.toml, metrics.json, checkpoint.pt,
curves.png, confusion.png, samples.png.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from segcore.config import (ARCHS, ENGINES, LOADERS, LOSSES, LR_SCALINGS,  # noqa: E402
                            MODES, MONITORS, NORMS, OPTIMIZERS, PRECISIONS,
                            PRED_THRESHOLDS, SCHEMES,
                            ConfigError, RunConfig, load_config, widths_for_depth)


def _widths(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--widths {s!r}: expected integers like 16,32,64")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="start from a config file (a sweep's configs/<run-id>.toml "
                                    "or an earlier run's config.toml); flags override it")
    p.add_argument("--data", help="dataset folder, or 'synthetic' (default)")
    p.add_argument("--classes", choices=SCHEMES, help="class scheme (default six)")
    p.add_argument("--class-map", help="class fold from a TOML file, e.g. "
                   "configs/classmaps/study-5.toml (sets --classes map)")
    p.add_argument("--unlabeled-threshold", type=float,
                   help="unlabeled-binary: standardized-gray cut (default 0.5, the study's "
                        "code; 0 = at the mean)")
    p.add_argument("--pred-threshold", choices=PRED_THRESHOLDS,
                   help="binary schemes: p > 0.5 (fixed, default) or each output image's "
                        "median/mean")
    p.add_argument("--arch", choices=ARCHS, help="U-Net style (default modern)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--depth", type=int, help="levels, widths doubling from 16")
    g.add_argument("--widths", type=_widths, help="channels per level, e.g. 16,32,64")
    p.add_argument("--norm", choices=NORMS)
    p.add_argument("--image-size", type=int, help="training crop side (default 128)")
    p.add_argument("--batch-size", type=int,
                   help="images per worker per step (default 8); the global batch with "
                        "--strong-scaling")
    p.add_argument("--epochs", type=int, help="accuracy budget in epochs (default 8)")
    p.add_argument("--steps", type=int, help="stop training after N optimizer steps")
    p.add_argument("--warmup-steps", type=int, help="untimed steps before the timed window")
    p.add_argument("--measure-steps", type=int,
                   help="timed steps after warm-up, whatever the dataset size (default 30)")
    p.add_argument("--lr", type=float, help="learning rate at one worker's batch")
    p.add_argument("--lr-scaling", choices=LR_SCALINGS,
                   help="lr rule for a larger global batch (default linear)")
    p.add_argument("--lr-warmup-steps", type=int, help="linear lr warm-up steps")
    p.add_argument("--optimizer", choices=OPTIMIZERS)
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
    p.add_argument("--loss", choices=LOSSES)
    p.add_argument("--class-weights", action="store_true", default=None)
    p.add_argument("--patience", type=int, help="early-stop patience in validations (0 = off)")
    p.add_argument("--monitor", choices=MONITORS)
    p.add_argument("--target-miou", type=float)
    p.add_argument("--strong-scaling", action="store_true", default=None,
                   help="--batch-size is the global batch, split over workers")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="synchronize BatchNorm statistics across workers")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--threads", type=int, help="CPU threads per worker (default cores/workers)")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    p.add_argument("--synthetic-images", type=int)
    p.add_argument("--strict", action="store_true", default=None)
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout", type=float, dest="timeout_s",
                   help="collective timeout in seconds (a dead peer fails the job)")
    p.add_argument("--run-id")
    p.add_argument("--sweep-id")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from last.pt (or checkpoint.pt) with its "
                        "saved configuration")
    p.add_argument("--out", help="output folder (default runs/latest)")
    # The DeepSpeed launcher passes --local_rank=N (torch.distributed.launch --local-rank);
    # the LOCAL_RANK the launcher also exports wins (see main).
    p.add_argument("--local-rank", "--local_rank", type=int, dest="local_rank",
                   help=argparse.SUPPRESS)
    return p


# Flags that may differ on --resume: they extend or observe the run, not change what it is.
RESUMABLE = {("train", "epochs"), ("train", "steps"), ("train", "patience"),
             ("train", "timeout_s"), ("train", "measure_steps"), ("train", "warmup_steps"),
             ("train", "val_every"), ("train", "threads"), ("data", "num_workers"),
             ("run", "run_id"), ("run", "sweep_id"), ("run", "out"), ("run", "mode")}


def overrides(a: argparse.Namespace) -> dict:
    """The configuration values the flags set, as a nested dict (unset flags left out)."""
    sets = {
        "model": dict(arch=a.arch, norm=a.norm, channels_last=a.channels_last,
                      compile=a.compile),
        "data": dict(source=a.data, class_scheme=a.classes, image_size=a.image_size,
                     loader=a.loader, augment=a.augment, num_workers=a.num_workers,
                     synthetic_images=a.synthetic_images, strict=a.strict,
                     class_map=a.class_map, unlabeled_threshold=a.unlabeled_threshold,
                     pred_threshold=a.pred_threshold),
        "train": dict(epochs=a.epochs, steps=a.steps, warmup_steps=a.warmup_steps,
                      measure_steps=a.measure_steps, lr=a.lr, lr_scaling=a.lr_scaling,
                      lr_warmup_steps=a.lr_warmup_steps, optimizer=a.optimizer,
                      engine=a.engine, zero_stage=a.zero_stage,
                      deepspeed_config=a.deepspeed_config, precision=a.precision,
                      loss=a.loss, class_weights=a.class_weights, patience=a.patience,
                      monitor=a.monitor, target_miou=a.target_miou,
                      strong_scaling=a.strong_scaling, sync_bn=a.sync_bn,
                      grad_accum=a.grad_accum, threads=a.threads, seed=a.seed,
                      timeout_s=a.timeout_s),
        "run": dict(mode=a.mode, out=a.out, run_id=a.run_id, sweep_id=a.sweep_id),
    }
    out = {k: {n: v for n, v in vals.items() if v is not None} for k, vals in sets.items()}
    if a.class_map is not None:
        if a.classes not in (None, "map"):
            raise ConfigError(f"--classes {a.classes} and --class-map {a.class_map} both "
                              "choose the classes; give one of them")
        out["data"]["class_scheme"] = "map"
    elif a.classes not in (None, "map"):
        out["data"]["class_map"] = None  # a named scheme replaces a --config's class map
    if a.batch_size is not None:
        out["train"]["local_batch_size"] = a.batch_size
        if a.strong_scaling:
            out["train"]["global_batch_size"] = a.batch_size
    if a.arch is not None:
        out["model"]["kernel"] = None  # the chosen architecture's default kernel
    if a.depth is not None:
        out["model"]["widths"] = list(widths_for_depth(a.depth))
    if a.widths is not None:
        out["model"]["widths"] = list(a.widths)
    return {k: v for k, v in out.items() if v}


def merge(base: dict, over: dict) -> RunConfig:
    """``over`` (from :func:`overrides`) applied to a configuration dict."""
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for section, values in over.items():
        if section == "run":
            d.update(values)
        else:
            d.setdefault(section, {}).update(values)
    if d.get("model", {}).get("arch") == "modern" and "norm" not in over.get("model", {}) \
            and d["model"].get("norm") == "none" and "arch" in over.get("model", {}):
        d["model"]["norm"] = "batch"  # switching from paper: the modern default norm
    return RunConfig.from_dict(d)


def config_from_args(a: argparse.Namespace) -> RunConfig:
    """Flags over the (optional) --config file over the defaults."""
    base = load_config(a.config).to_dict() if a.config else RunConfig().to_dict()
    return merge(base, overrides(a))


def resume_config(a: argparse.Namespace, saved: dict) -> RunConfig:
    """The saved configuration of the run being resumed, with the flags that may change;
    any other flag (or --config value) that contradicts it is refused by name."""
    old = RunConfig.from_dict(saved).to_dict()
    asked = merge(load_config(a.config).to_dict() if a.config else old, overrides(a))
    new = asked.to_dict()
    diffs = [f"{section}.{k}: saved {old[section].get(k)!r}, asked {v!r}"
             for section in ("model", "data", "train") for k, v in new[section].items()
             if (section, k) not in RESUMABLE and k not in ("world_size", "global_batch_size")
             and old[section].get(k) != v]
    if diffs:
        raise ConfigError("--resume continues the saved configuration; these values "
                          "contradict it: " + "; ".join(diffs) + ". Drop them, or start a "
                          "new run with another --out")
    return asked


@record  # under torchrun: the failing rank and its error reach the agent's report
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" \
        else ""
    say = (lambda msg: print(msg, flush=True)) if rank in (None, "0") else (lambda _m: None)
    try:
        from segcore.data.layouts import DatasetError
        from segcore.train.checkpoint import CheckpointError, load_for_resume

        die_with_parent()
        resume_state = None
        if a.resume:
            out = Path(a.out or RunConfig().out)
            if not out.is_dir():
                raise ConfigError(f"--resume: {out} is not a run folder; pass the --out of "
                                  "the run to continue")
            path, resume_state = load_for_resume(out, log=say)
            cfg = resume_config(a, resume_state["config"])
            say(f"resuming {out} from {path.name} (epoch {resume_state['epoch'] + 1})")
        else:
            cfg = config_from_args(a)
        out = Path(cfg.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a folder for the run's outputs")
        from segcore.train.run import run

        run(cfg, log=say, resume_state=resume_state)
    except (ConfigError, FileNotFoundError, DatasetError, CheckpointError) as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}interrupted: checkpoints already written are kept; continue with "
              f"--resume --out {a.out or RunConfig().out}", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        if is_oom(e):
            print(f"{prefix}error: out of memory: {one_line(e)}. Lower --batch-size or "
                  "--image-size, or use --precision bf16", file=sys.stderr, flush=True)
            return 3
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            print(f"{prefix}error: no space left on the device writing "
                  f"{e.filename or 'the outputs'}; free space or choose another --out "
                  "(files already written are kept)", file=sys.stderr, flush=True)
            return 4
        print(f"{prefix}error: {type(e).__name__}: {one_line(e)}", file=sys.stderr, flush=True)
        raise
    return 0


def one_line(e: BaseException, limit: int = 400) -> str:
    return " ".join(str(e).split())[:limit]


def is_oom(e: BaseException) -> bool:
    """CUDA and CPU allocator failures (``DefaultCPUAllocator: can't allocate memory``)."""
    import torch

    text = str(e).lower()
    return (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
            or "can't allocate memory" in text or "cannot allocate memory" in text)


def die_with_parent() -> None:
    """Under a sweep (``SEGBENCH_DIE_WITH_PARENT=1``) this worker is killed when its parent
    (the torchrun agent) dies, ``kill -9`` included, so no orphan keeps training."""
    if os.environ.get("SEGBENCH_DIE_WITH_PARENT") != "1" or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def leave(rc: int | None) -> None:
    """Exit with ``rc`` without interpreter shutdown once everything is written and
    flushed: a gloo worker (DeepSpeed's CPU op, or a torch thread) aborts there now and
    then ("terminate called without an active exception", SIGABRT) after every result
    was written, and torchrun would report a finished job as failed. DataLoader workers
    notice their parent leaving and exit too."""
    sys.stdout.flush()
    sys.stderr.flush()
    # main() returns None where argparse exited (--help: 0), as torch's @record passes
    # SystemExit's code through.
    os._exit(rc if isinstance(rc, int) else 0 if rc is None else 1)


if __name__ == "__main__":
    leave(main())
