"""Validate a Semantic Drone Dataset folder and cache it at working resolution.

    python launch/prepare.py --src /data/semantic_drone_dataset --out /data/sdd-1024
    python launch/prepare.py --src /data/sdd --out /data/sdd-512-bin --size 512 --classes binary
    python launch/prepare.py --src /data/sdd --out /data/sdd-study --size 1500 --classes six \
        --offline-augment 4          # the reference study's 4 variants per training photo

Then train on the cache: python launch/train.py --data /data/sdd-1024 --classes six
(the cache serves the scheme it was prepared for; a --classes full cache serves every
scheme and class map). Re-running finishes an interrupted run and rewrites nothing that
is already there.
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segcore.config import ConfigError  # noqa: E402
from segcore.data.layouts import DatasetError  # noqa: E402
from segcore.data.prepare import PREPARE_SCHEMES, VARIANTS, prepare  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error of this script
        self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="dataset folder (Kaggle, TU Graz or "
                   "images/ + masks/ layout)")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--size", type=int, default=1024,
                   help="long side of the cached images in pixels (default 1024; never "
                   "upscales; the study worked at 1500)")
    p.add_argument("--classes", choices=PREPARE_SCHEMES, default="six",
                   help="class scheme the cached masks hold (default six)")
    p.add_argument("--unlabeled-threshold", type=float,
                   help="--classes unlabeled-binary: standardized-gray cut (default 0.5, the "
                   "study's code; 0 = at the mean)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--strict", action="store_true",
                   help="fail on any bad file instead of skipping its pair (every problem "
                   "is named either way)")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--test-fraction", type=float, default=0.15,
                   help="held-out share recorded in the manifest (default 0.15)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--offline-augment", type=int, default=1, metavar="N",
                   help=f"cache the first N of the study's variants ({', '.join(VARIANTS)}) "
                   "of each training photo, image and mask paired; 4 = the study's x4 "
                   "(default 1: none)")
    p.add_argument("--augment-seed", type=int, default=0,
                   help="seed of the offline crop windows (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _os_error(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device{where}; free space or choose another --out "
                "(files already written are kept; re-run to finish)")
    return (f"{e.strerror or e}{where}; check that --src is readable and --out writable, "
            "then re-run (files already written are kept)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from concurrent.futures.process import BrokenProcessPool

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = prepare(args.src, args.out, size=args.size, classes=args.classes,
                          quality=args.quality, strict=args.strict, workers=args.workers,
                          test_fraction=args.test_fraction, seed=args.seed,
                          progress=not args.quiet, offline_augment=args.offline_augment,
                          augment_seed=args.augment_seed,
                          unlabeled_threshold=args.unlabeled_threshold)
            error = None
        except (DatasetError, ConfigError) as e:
            error = str(e)
        except OSError as e:
            error = _os_error(e)
        except (BrokenProcessPool, MemoryError) as e:
            error = (f"a worker process died ({type(e).__name__}), most likely out of "
                     "memory; re-run with fewer --workers or a smaller --size (finished "
                     "files are kept)")
        except KeyboardInterrupt:
            print("interrupted: finished files are kept; re-run the same command to resume",
                  file=sys.stderr)
            return 130
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    m = res.manifest
    aug = m.get("offline_augment")
    copies = f" (x{aug['copies']} offline augmentation)" if aug else ""
    print(f"prepared {res.out}: {len(m['split']['train'])} train / {len(m['split']['test'])} "
          f"test pairs{copies}, "
          f"{m['scheme']['name']} classes, long side {m['size']} px, JPEG q"
          f"{m['quality']}; {res.written} converted ({res.images_per_s:.1f} img/s), "
          f"{res.reused} already there, {len(res.skipped)} skipped, {res.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
