"""``python -m pilot.data`` (also ``pilot-data``): prepare and verify dataset roots.

    python -m pilot.data prepare NAME --source PATH [--root DIR] [--split S] [--no-checksum]
    python -m pilot.data prepare NAME [--root DIR] --verify

Exit status 0 when the root is prepared (or already was) and matches its manifest, 2 when the
source or the root is refused (the message says why).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pilot.errors import PilotError

NAMES = ("cifar100", "imagenet_r", "imagenet_a", "cub", "objectnet", "omnibenchmark", "vtab", "image_folder")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pilot.data", description="Prepare a dataset root from a downloaded archive or folder."
    )
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser(
        "prepare",
        help="extract or link a source into a dataset root, apply the split, write manifest.csv",
        description="Check, extract (or link) and split a dataset source into a root that the dataset configs "
        "read, and write manifest.csv, manifest.sha256 and prepared.json there. With --verify, recheck a "
        "prepared root against its manifest instead.",
    )
    prep.add_argument("name", choices=NAMES, help="the dataset (as in dataset=NAME)")
    prep.add_argument("--source", help="the downloaded archive (.tar, .tar.gz, .tgz, .zip) or an extracted folder")
    prep.add_argument(
        "--root",
        help="the dataset root to create (default: dataset.root of configs/dataset/NAME.yaml, "
        "i.e. $PILOT_DATA_DIR or ./data, then the dataset's folder)",
    )
    prep.add_argument(
        "--split",
        help="imagenet_r: aper for the APER archive (imagenet-r.zip), dualprompt or coda for the original "
        "imagenet-r.tar (one of the two must be given); cub: aper for cub.zip, official for CUB_200_2011.tgz. "
        "Where the source allows only one split it is chosen without this option",
    )
    prep.add_argument(
        "--no-checksum", action="store_true", help="do not compare the archive with its published checksum"
    )
    prep.add_argument(
        "--verify", action="store_true", help="recheck a prepared root against its manifest (no --source)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.verify and args.source:
        parser().error("--verify rechecks a prepared root: give --root (or nothing), not --source")
    if not args.verify and not args.source:
        parser().error("prepare needs --source PATH (or --verify to recheck a prepared root)")
    from pilot.data import prepare  # after argument parsing: --help stays fast

    try:
        if args.verify:
            prepare.verify(args.name, args.root)
        else:
            prepare.prepare(args.name, args.source, args.root, args.split, check_checksum=not args.no_checksum)
    except PilotError as err:
        sys.stdout.flush()  # what was found so far comes before the reason for stopping
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
