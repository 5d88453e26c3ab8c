#!/usr/bin/env python
"""Write train/val split lists (and SHA256SUMS) for your own ImageFolder tree.

    python tools/make_splits.py /data/my_scenes --val-fraction 0.2 --seed 0

writes ``/data/my_scenes/train.txt``, ``val.txt`` (one ``./<class>/<file>`` line per image, the format of
``splits/`` and of ``--eval_train_fnames/--eval_val_fnames``) and ``SHA256SUMS``. The split is stratified
per class and reproducible for a given seed. ``--check`` verifies an existing SHA256SUMS instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run as a script: this checkout's modules, as tools/export_encoder.py does
    sys.path.insert(0, str(_REPO_ROOT))

from dataloaders.errors import DataError  # noqa: E402
from dataloaders.scenes import fmow_rgb_filter  # noqa: E402
from dataloaders.splits import verify_sha256sums, write_split_lists  # noqa: E402
from harness import ArgumentParser  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="ImageFolder root: <root>/<class>/<image>")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of each class put in val (0.2)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (0)")
    p.add_argument("--train-name", default="train.txt", help="train list file name (train.txt)")
    p.add_argument("--val-name", default="val.txt", help="val list file name (val.txt)")
    p.add_argument("--fmow", action="store_true", help="keep only *_rgb.jpg files (fMoW-rgb tree)")
    p.add_argument("--no-checksums", action="store_true", help="do not write SHA256SUMS")
    p.add_argument("--check", action="store_true", help="only verify <root>/SHA256SUMS")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        if args.check:
            bad = verify_sha256sums(args.root / "SHA256SUMS")
            for name, (expected, got) in bad.items():
                print(f"{args.root / name}: checksum mismatch: expected {expected}, got {got}", file=sys.stderr)
            print("OK" if not bad else f"{len(bad)} mismatch(es)")
            return 1 if bad else 0
        train, val = write_split_lists(args.root, args.val_fraction, args.seed, args.train_name, args.val_name,
                                       checksums=not args.no_checksums,
                                       is_valid_file=fmow_rgb_filter if args.fmow else None)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_train = sum(1 for _ in open(train, encoding="utf-8"))
    n_val = sum(1 for _ in open(val, encoding="utf-8"))
    print(f"wrote {train} ({n_train} images) and {val} ({n_val} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
