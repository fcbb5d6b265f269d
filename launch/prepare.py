"""Validate a Semantic Drone Dataset folder and cache it at working resolution.

    python launch/prepare.py --src /data/semantic_drone_dataset --out /data/sdd-1024
    python launch/prepare.py --src /data/sdd --out /data/sdd-512-bin --size 512 --classes binary

Then train on the cache: python launch/train.py --data /data/sdd-1024 --classes six
(the cache serves the scheme it was prepared for). Re-running finishes an interrupted run
and rewrites nothing that is already there.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segcore.config import SCHEMES, ConfigError  # noqa: E402
from segcore.data.layouts import DatasetError  # noqa: E402
from segcore.data.prepare import prepare  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="dataset folder (Kaggle, TU Graz or "
                   "images/ + masks/ layout)")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--size", type=int, default=1024,
                   help="long side of the cached images in pixels (default 1024; never "
                   "upscales)")
    p.add_argument("--classes", choices=SCHEMES, default="six",
                   help="class scheme the cached masks hold (default six)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--strict", action="store_true",
                   help="fail on any bad file instead of skipping its pair")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--test-fraction", type=float, default=0.15,
                   help="held-out share recorded in the manifest (default 0.15)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = prepare(args.src, args.out, size=args.size, classes=args.classes,
                          quality=args.quality, strict=args.strict, workers=args.workers,
                          test_fraction=args.test_fraction, seed=args.seed,
                          progress=not args.quiet)
            error = None
        except (DatasetError, ConfigError, OSError) as e:
            error = e
        except KeyboardInterrupt:
            print("interrupted: finished files are kept; re-run the same command to resume",
                  file=sys.stderr)
            return 130
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    m = res.manifest
    print(f"prepared {res.out}: {len(m['split']['train'])} train / {len(m['split']['test'])} "
          f"test pairs, {m['scheme']['name']} classes, long side {m['size']} px, JPEG q"
          f"{m['quality']}; {res.written} converted ({res.images_per_s:.1f} img/s), "
          f"{res.reused} already there, {len(res.skipped)} skipped, {res.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
