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

from segcore.cli import assignments, parse_assignment  # noqa: E402
from segcore.config import ConfigError  # noqa: E402
from segcore.faults import handle_sigterm  # noqa: E402
from segcore.registry import DECODES, LOADERS, engine_axis_choices  # noqa: E402
from segcore.sweep.driver import SweepInterrupted  # noqa: E402


def int_list(flag: str):
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
    p.add_argument("--gpus", type=int_list("--gpus"),
                   help="worker counts per node (GPUs, or CPU processes without GPUs); "
                        "default: 1,2,4.. up to the GPUs present, 1,2 on CPU")
    p.add_argument("--batch-sizes", type=int_list("--batch-sizes"),
                   help="per-worker batch sizes (default 4,8)")
    p.add_argument("--depths", type=int_list("--depths"),
                   help="U-Net depths, widths doubling from 16 (default 3,4)")
    p.add_argument("--engines", type=_strs(None, "--engines"), default=["ddp"],
                   help=f"{engine_axis_choices()} (default ddp)")
    p.add_argument("--loaders", type=_strs(LOADERS, "--loaders"),
                   help=f"{', '.join(LOADERS)} (default torch)")
    p.add_argument("--decodes", type=_strs(DECODES, "--decodes"),
                   help="where the torch loader decodes training JPEGs: cpu, gpu or cpu,gpu "
                        "(the axis data.decode; rows record it as decode; default cpu)")
    p.add_argument("--precisions", type=_strs(("fp32", "bf16", "fp16"), "--precisions"),
                   help="fp32, bf16, fp16 (default fp32)")
    p.add_argument("--channels-last", type=_bools,
                   help="on, off or on,off (default on)")
    p.add_argument("--data", default="synthetic", help="dataset folder or 'synthetic'")
    p.add_argument("--classes", choices=("binary", "six", "full"), help="default six")
    p.add_argument("--arch", choices=("paper", "modern"), help="default modern")
    p.add_argument("--mode", choices=("throughput", "accuracy", "both"),
                   help="default both")
    p.add_argument("--preset", help="a named grid: paper (the reference study), gpu (a "
                   "workload that loads a GPU: widths 64-1024, 512 px, bf16, eager and "
                   "compiled, the batch probed; the default when CUDA is visible), smoke")
    p.add_argument("--image-size", type=int, help="training crop side (default 128)")
    p.add_argument("--epochs", type=int,
                   help="accuracy budget per configuration, in epochs (default 6)")
    p.add_argument("--steps", type=int, help="stop each job's training after N steps")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--measure-steps", type=int, default=30,
                   help="timed steps per configuration after warm-up (default 30)")
    p.add_argument("--lr", type=float, help="learning rate at one worker's batch")
    p.add_argument("--lr-scaling", choices=("linear", "sqrt", "none"), default="linear",
                   help="lr rule for larger global batches (default linear, Goyal et al.)")
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
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep in --out (default: the latest under "
                        "runs/sweeps): run only configurations not yet recorded")
    p.add_argument("--dry-run", action="store_true",
                   help="print each workload and job command, and write the config files "
                        "the commands name; run nothing")
    p.add_argument("--set", dest="set_items", action="append", default=[],
                   metavar="PATH=VALUE",
                   help="any configuration field for every job, e.g. --set "
                        "data.synthetic_images=40 (launch/train.py --help-config lists them)")
    p.add_argument("--axis", dest="axis_items", action="append", default=[],
                   metavar="PATH=V1,V2",
                   help="any configuration field as one more axis of the grid, e.g. --axis "
                        "train.weight_decay=0,1e-4 (rows record it as axis.<path>); repeat "
                        "it for more axes")
    p.add_argument("--train-arg", action="append", default=[], metavar="FLAG=VALUE",
                   help="a launch/train.py flag for every job, e.g. "
                        "--train-arg=--synthetic-images=40")
    return p


# epochs 6: at 2 the 2-worker runs (half the steps at twice the lr) ended 0.21-0.28 mIoU
# below the 1-worker runs; at 6 within 0.01 (2-core CPU), in about 3 minutes.
DEFAULTS = {"batch_sizes": [4, 8], "depths": [3, 4], "classes": "six", "arch": "modern",
            "image_size": 128, "epochs": 6, "loaders": ["torch"], "precisions": ["fp32"],
            "channels_last": [True], "mode": "both"}
# Flags that choose the workload: none given and CUDA visible -> --preset gpu.
WORKLOAD_FLAGS = ("batch_sizes", "depths", "classes", "arch", "image_size", "loaders",
                  "precisions", "channels_last", "mode", "epochs", "steps")
SWEEPS = Path("runs") / "sweeps"


def train_overrides(items: list[str]) -> dict:
    """``--train-arg FLAG=VALUE`` items parsed by launch/train.py's own flags (generated
    from the configuration), as the nested configuration values they set."""
    from segcore.cli import add_config_arguments, overrides

    flags = []
    for item in items:
        k, eq, v = item.partition("=")
        flags += [k, v] if eq else [k]
    p = argparse.ArgumentParser(prog="--train-arg", add_help=False, exit_on_error=False)
    add_config_arguments(p)
    try:
        ns = p.parse_args(flags)
    except (argparse.ArgumentError, SystemExit) as e:
        raise ConfigError(f"--train-arg {' '.join(items)}: {e}; use the form "
                          "--train-arg=--synthetic-images=40") from None
    over = overrides(ns)
    over.pop("run", None)
    return over


def _merged(*overs: dict) -> dict:
    out: dict = {}
    for over in overs:
        for section, values in over.items():
            out.setdefault(section, {}).update(values)
    return out


def axes(items: list[str], decodes: list[str] | None = None) -> dict[str, list[str]]:
    """``--axis PATH=V1,V2`` items as ``{path: [text, ...]}`` (typed by the grid).
    A list-valued field (``model.widths``) separates its values with ``;``.
    ``decodes`` (``--decodes``) is the axis ``data.decode``."""
    from segcore.cli import field

    out: dict[str, list[str]] = {}
    if decodes:
        if any(parse_assignment(item, "--axis")[0] == "data.decode" for item in items):
            raise ConfigError("--decodes and --axis data.decode=... name the same axis; "
                              "give one of them")
        out["data.decode"] = list(decodes)
    for item in items:
        path, text = parse_assignment(item, "--axis")
        sep = ";" if field(path).kind is tuple else ","
        values = [v.strip() for v in text.split(sep) if v.strip()]
        if not values or path in out:
            raise ConfigError(f"--axis {item!r}: give each field once, with its values "
                              f"separated by '{sep}'")
        out[path] = values
    return out


def _recorded(a: argparse.Namespace) -> dict | None:
    """The grid recorded in the folder a --resume continues (its sweep.json), if any."""
    import json

    folder = Path(a.out) if a.out else None
    if folder is None:
        try:
            folder = latest_sweep()
        except ConfigError:
            return None
    try:
        return json.loads((folder / "sweep.json").read_text()).get("spec")
    except (OSError, ValueError):
        return None


def _probe_batch(spec, cuda: bool, dry_run: bool, recorded: dict | None = None) -> None:
    """The GPU preset's per-GPU batch: the largest that fits (segcore.train.probe, in a
    process of its own so this one holds no GPU memory), recorded in every row. A
    resumed sweep keeps the batch its folder recorded (a new probe could differ)."""
    import json
    import subprocess

    from segcore.sweep.grid import GPU_CPU_BATCH, GPU_HEADROOM

    if recorded and recorded.get("preset_rows"):
        spec.preset_rows = recorded["preset_rows"]
        spec.row_extra = recorded.get("row_extra") or {}
        print(f"batch {spec.preset_rows[0]['batch']} per GPU, as this sweep recorded it",
              flush=True)
        return
    row = spec.preset_rows[0]
    if not cuda or dry_run:
        why = "no GPU here" if not cuda else "--dry-run"
        print(f"batch: probed on the GPU at start ({why}: batch {GPU_CPU_BATCH} shown)",
              flush=True)
        spec.row_extra = {"batch_source": "fixed (no GPU to probe)" if not cuda
                          else "fixed (dry run)"}
        return
    print(f"probing the largest per-GPU batch that fits with {GPU_HEADROOM:.0%} headroom "
          f"(widths {row['widths']}, {spec.image_size} px, {spec.precisions[0]})...",
          flush=True)
    p = subprocess.run([sys.executable, "-m", "segcore.train.probe", "--widths",
                        row["widths"], "--image-size", str(spec.image_size), "--precision",
                        spec.precisions[0], "--headroom", str(GPU_HEADROOM)],
                       capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"the batch probe failed ({msg}); give --batch-sizes instead of "
                          "--preset gpu")
    found = json.loads(p.stdout.strip().splitlines()[-1])
    for r in spec.preset_rows:
        r["batch"] = found["batch"]
    spec.row_extra = {"batch_source": "probe", "batch_probe_peak_mb": found["peak_mb"],
                      "batch_probe_headroom": found["headroom"],
                      "batch_probe_device_mb": found["device_mb"]}
    print(f"batch {found['batch']} per GPU: peak {found['peak_mb']:.0f} MiB of "
          f"{found['device_mb']:.0f} MiB ({found['headroom']:.0%} headroom kept)", flush=True)


def latest_sweep() -> Path:
    """The most recently started sweep folder under runs/sweeps (for --resume alone)."""
    found = sorted(SWEEPS.glob("*/sweep.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"--resume without --out: no sweep folder under {SWEEPS}; pass "
                          "--out with the folder to continue")
    return found[-1].parent


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    # Under `torchrun launch/sweep.py` only one process per node drives the sweep.
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return 0
    handle_sigterm()  # scancel, a time limit, preemption: handled as Ctrl-C
    try:
        import torch

        from segcore.host import capture_env, hardware_tag, usable_cores
        from segcore.sweep.driver import run_sweep
        from segcore.sweep.grid import PRESET_FIELDS, SweepSpec, preset

        cuda = torch.cuda.is_available()
        argv_used = list(sys.argv[1:] if argv is None else argv)
        if (a.preset is None and cuda and not a.resume
                and all(getattr(a, f) is None for f in WORKLOAD_FLAGS)):
            a.preset = "gpu"
            argv_used += ["--preset", "gpu"]  # so that the resume command says it
            print("CUDA is visible: the default workload is --preset gpu (U-Net widths "
                  "64-1024, 512 px, bf16, channels-last, eager and compiled, the per-GPU "
                  "batch probed); give any workload flag for another", flush=True)
        if a.preset:
            p = preset(a.preset)  # unknown names fail here
            given = [f for f in PRESET_FIELDS[a.preset] if getattr(a, f, None) is not None]
            if given:
                flags = ", ".join("--" + g.replace("_", "-") for g in given)
                raise ConfigError(f"--preset {a.preset} sets {flags} itself; drop {flags} "
                                  "or the preset")
        epochs_given = a.epochs is not None
        for k, v in DEFAULTS.items():
            if getattr(a, k) is None:
                setattr(a, k, v)
        if not a.timeout > 0:
            raise ConfigError(f"--timeout {a.timeout:g}: a job needs a time limit above 0 "
                              "seconds (default 1800)")
        if a.data != "synthetic" and not Path(a.data).is_dir():
            raise ConfigError(f"--data {a.data}: no such folder; prepare one with "
                              "launch/prepare.py, or use --data synthetic")
        workers = a.gpus or default_workers()
        cpu = not torch.cuda.is_available()
        threads = a.threads or None
        if cpu and not threads:
            threads = max(1, usable_cores() // max(workers))
        spec = SweepSpec(workers=workers, batch_sizes=a.batch_sizes, depths=a.depths,
                         engines=a.engines, loaders=a.loaders, precisions=a.precisions,
                         channels_last=a.channels_last, data=a.data, classes=a.classes,
                         arch=a.arch, mode=a.mode, image_size=a.image_size,
                         epochs=a.epochs, steps=a.steps, warmup_steps=a.warmup_steps,
                         measure_steps=a.measure_steps, lr=a.lr, lr_scaling=a.lr_scaling,
                         repeats=a.repeats, strong_scaling=a.strong_scaling,
                         threads=threads, nnodes=a.nnodes, rdzv_endpoint=a.rdzv_endpoint,
                         timeout_s=a.timeout,
                         overrides=_merged(train_overrides(a.train_arg),
                                           assignments(a.set_items)),
                         axes=axes(a.axis_items, a.decodes))
        if a.preset == "paper":
            p = preset("paper", a.epochs if epochs_given else None)
            if epochs_given:
                print(f"note: --epochs {a.epochs} replaces each study session's own epochs "
                      "(a short run of the study)", flush=True)
        if a.preset:
            spec.preset_rows = p["rows"]
            for key in ("arch", "image_size", "epochs", "loaders", "precisions",
                        "channels_last", "mode"):
                if key in p:
                    setattr(spec, key, p[key])
            spec.axes = {**p.get("axes", {}), **spec.axes}
            spec.preset = a.preset
            if p.get("probe_batch"):
                _probe_batch(spec, cuda, a.dry_run, _recorded(a) if a.resume else None)
        node_rank = a.node_rank
        if node_rank is None:
            raw = os.environ.get("SLURM_NODEID", os.environ.get("GROUP_RANK", "0"))
            if not raw.isdigit():
                raise ConfigError(f"the node rank from SLURM_NODEID / GROUP_RANK is {raw!r}; "
                                  "pass --node-rank N")
            node_rank = int(raw)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        sweep_id = a.sweep_id or f"{hardware_tag(capture_env([]))}-{stamp}"
        if a.out:
            out = Path(a.out)
        elif a.resume:
            out = latest_sweep()
            print(f"resuming the latest sweep: {out}", flush=True)
        else:
            out = SWEEPS / sweep_id
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a folder for the results")
        if "TORCHELASTIC_RUN_ID" in os.environ and a.nnodes == 1:
            print("note: the sweep starts its own torchrun job per configuration; "
                  "`python launch/sweep.py` does the same, and on Ctrl-C it is spared "
                  "torchrun's own traceback", flush=True)
        if cpu:
            print(f"no GPU: each worker is a CPU process with {threads} thread(s) (gloo). "
                  "CPU timings show code paths and relative effects, not GPU performance.",
                  flush=True)
        run_sweep(spec, out, sweep_id, resume=a.resume, dry_run=a.dry_run,
                  is_writer=node_rank == 0, log=lambda m: print(m, flush=True),
                  argv=[sys.argv[0] if argv is None else "launch/sweep.py", *argv_used])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SweepInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before the sweep started: nothing was recorded", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
