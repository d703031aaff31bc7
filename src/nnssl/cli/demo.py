"""`nnssl_demo`: run the pipeline end to end on generated phantoms (no data, no GPU needed)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from nnssl.cli.common import add_verbose, make_parser, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("nnssl_demo", __doc__)
    p.add_argument("-o", "--folder", type=Path, default=Path("nnssl_demo"),
                   help="folder for the demo's nnssl_raw / nnssl_preprocessed / nnssl_results")
    p.add_argument("-n", "--num_volumes", type=int, default=24, help="number of phantom volumes")
    p.add_argument("--shape", type=int, nargs=3, default=(48, 48, 48), metavar=("X", "Y", "Z"),
                   help="phantom size in voxels")
    p.add_argument("-np", type=int, default=2, dest="num_processes", help="worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed for the phantoms")
    add_verbose(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        from nnssl.demo import DemoConfig, run_demo

        result = run_demo(DemoConfig(folder=args.folder, num_volumes=args.num_volumes,
                                     shape=tuple(args.shape), seed=args.seed,
                                     num_processes=args.num_processes))
        print(result.format())
        return 0

    return run_cli(build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
