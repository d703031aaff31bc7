"""`nnssl_verify_dataset`: header-only check of every image and mask of a dataset.

Exit status: 0 no problems, 1 problems found (listed, and saved as JSON), 2 usage or input error.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from nnssl.cli.common import add_verbose, make_parser, positive_int, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("nnssl_verify_dataset", __doc__)
    p.add_argument("-d", required=True, dest="dataset", help="dataset id (745) or name (Dataset745_X)")
    p.add_argument("-np", type=positive_int, default=4, dest="num_processes", help="worker processes")
    p.add_argument("-o", type=Path, default=None, dest="output",
                   help="JSON report path (default: $nnssl_raw/DatasetXXX_Name/integrity_report.json)")
    add_verbose(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        from nnssl.data.integrity import default_report_path, verify_dataset

        report = verify_dataset(args.dataset, num_processes=args.num_processes)
        out = args.output or default_report_path(args.dataset)
        report.save(out)
        print(report.format_table())
        print(f"report written to {out}")
        return 0 if report.ok else 1

    return run_cli(build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
