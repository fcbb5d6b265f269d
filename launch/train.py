"""Train and evaluate one configuration.

    python launch/train.py                                  # defaults: synthetic, six classes
    torchrun --nproc-per-node 2 launch/train.py --engine ddp
    python launch/train.py --data /data/sdd --classes binary --arch paper --depth 3

Writes to --out: result.json (one results row), config.toml, metrics.json, checkpoint.pt,
curves.png, confusion.png, samples.png.
"""

from __future__ import annotations

import os

# Who started this process, read before the heavy imports below: if that parent (the
# torchrun agent) dies while torch loads, this process is re-parented (to init, or to a
# subreaper such as systemd --user or tini -s) and must notice (die_with_parent).
_PARENT_AT_START = os.getppid()

import argparse  # noqa: E402
import errno  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from segcore.cli import add_config_arguments, overrides  # noqa: E402
from segcore.config import ConfigError, RunConfig, load_config  # noqa: E402
from segcore.data.images import ImageReadError  # noqa: E402
from segcore.data.layouts import DatasetError  # noqa: E402
from segcore.faults import (die_with_parent, handle_sigterm, interruption,  # noqa: E402
                            is_oom, one_line)
from segcore.train.checkpoint import CheckpointError, load_for_resume  # noqa: E402
from segcore.train.trainer import Diverged  # noqa: E402
# Exit codes besides 0 and 1: what the sweep's failure rows are told apart by (4: the
# outputs could not be written, a failure of the environment that --resume runs again).
EXIT_CONFIG, EXIT_OOM, EXIT_OUTPUT, EXIT_DIVERGED = 2, 3, 4, 5
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO)



def parser() -> argparse.ArgumentParser:
    """Every configuration field is a flag: the everyday ones by name (``--lr``), any
    other as ``--set train.weight_decay=0`` (``--help-config`` lists them all)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="start from a config file (a sweep's configs/<run-id>.toml "
                                    "or an earlier run's config.toml); flags override it")
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from last.pt (or checkpoint.pt) with its "
                        "saved configuration")
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


def merge(base: dict, over: dict) -> RunConfig:
    """``over`` (from :func:`overrides`) applied to a configuration dict."""
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    identity = {"run_id", "sweep_id", "out"}  # naming a run does not change what it is
    if any((section == "run" and k not in identity and d.get(k) != v) or
           (section != "run" and d.get(section, {}).get(k) != v)
           for section, values in over.items() for k, v in values.items()):
        d["resolved"] = False  # changed after it was resolved: the run resolves it anew
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
    handle_sigterm()
    if a.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" \
        else ""
    say = (lambda msg: print(msg, flush=True)) if rank in (None, "0") else (lambda _m: None)
    out_hint = a.out or RunConfig().out  # the run's folder once its config is known
    try:
        # Under a sweep the worker dies with its parent (the torchrun agent), kill -9
        # included, so no orphan keeps training.
        if os.environ.get("SEGBENCH_DIE_WITH_PARENT") == "1":
            driver = os.environ.get("SEGBENCH_DRIVER_PID", "")
            die_with_parent(_PARENT_AT_START, int(driver) if driver.isdigit() else None)
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
        out_hint = str(out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a folder for the run's outputs")
        from segcore.train.run import run

        run(cfg, log=say, resume_state=resume_state)
    except (ConfigError, FileNotFoundError, DatasetError, CheckpointError) as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except Diverged as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except ImageReadError as e:  # a training image that cannot be decoded, on any path
        print(f"{prefix}error: {_image_error(e)}; replace the file, or run launch/prepare.py "
              "to check the dataset", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (scancel, preemption): the same
        print(f"{prefix}interrupted ({interruption(e)}): checkpoints already written are "
              f"kept; continue with --resume --out {out_hint}",
              file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        if is_oom(e):
            print(f"{prefix}error: out of memory: {one_line(e)}. Lower --batch-size or "
                  "--image-size, or use --precision bf16", file=sys.stderr, flush=True)
            return EXIT_OOM
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            print(f"{prefix}error: no space left on the device writing "
                  f"{e.filename or 'the outputs'}; free space or choose another --out "
                  "(files already written are kept)", file=sys.stderr, flush=True)
            return EXIT_OUTPUT
        if isinstance(e, OSError) and e.errno in _UNWRITABLE:
            print(f"{prefix}error: cannot write {e.filename or 'the outputs'} "
                  f"({e.strerror}); make the folder writable or choose another --out "
                  "(files already written are kept)", file=sys.stderr, flush=True)
            return EXIT_OUTPUT
        print(f"{prefix}error: {type(e).__name__}: {one_line(e)}", file=sys.stderr, flush=True)
        raise
    return 0


def _image_error(e: ImageReadError) -> str:
    """The error's own line: raised in a DataLoader worker, it arrives with the worker's
    traceback in its message, and its last line is the original error."""
    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return last.split("ImageReadError: ", 1)[-1]


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
