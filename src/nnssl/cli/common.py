"""Shared command-line conventions.

nnU-Net users type single-dash long flags (`-np`, `-num_gpus`, `-tr`); argparse handles
them as ordinary options. Unknown flags are errors (we never use `parse_known_args`), and
user errors (`NnsslError`) print one message and exit with status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from nnssl.errors import NnsslError
from nnssl.log import setup_logging


class _ExactOptionsParser(argparse.ArgumentParser):
    """Options match exactly. With `allow_abbrev=False` argparse (3.11) still expands
    single-dash prefixes, so `-n 3` would silently become `-np 3`; here it is an error."""

    def _get_option_tuples(self, option_string: str) -> list:
        return []


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _ExactOptionsParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="print debug messages")


def run_cli(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse `argv`, set up logging and run `body`; user errors become exit status 2."""
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        code = body(args)
    except NnsslError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
