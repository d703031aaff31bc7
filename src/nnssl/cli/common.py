"""Shared command-line conventions.

nnU-Net users type single-dash long flags (`-np`, `-num_gpus`, `-tr`); argparse handles
them as ordinary options. Unknown flags are errors (we never use `parse_known_args`), and
user errors (`NnsslError`) print one message and exit with status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence

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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
DEVICE_HELP = "cuda, cuda:N, cpu or mps"


def device(text: str) -> str:
    """`-device` of every command: cuda, cuda:N, cpu or mps, and present on this machine, checked
    when the command line is read (a typo or a missing GPU is reported before any work)."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use {DEVICE_HELP}")
    if text == "cpu":
        return text
    import torch

    if text.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is visible here; use -device cpu "
                                             "(or check nvidia-smi / CUDA_VISIBLE_DEVICES)")
        index = text.partition(":")[2]
        if index and int(index) >= count:
            raise argparse.ArgumentTypeError(f"{text}: {count} CUDA device(s) are visible "
                                             f"(cuda:0 .. cuda:{count - 1})")
    elif not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use -device cpu")
    return text


def add_shape(parser: argparse.ArgumentParser, default: Sequence[int], what: str) -> None:
    """`--shape Z Y X` in every command that has it: numpy array order, as SimpleITK and nnU-Net
    read images (the reverse of the x, y, z of a NIfTI header or of nibabel)."""
    parser.add_argument("--shape", type=positive_int, nargs=3, default=tuple(default), metavar=("Z", "Y", "X"),
                        help=f"{what}, in array order Z Y X (numpy order, as SimpleITK and nnU-Net read images)")


class _Rejected(argparse.Action):
    """A flag users bring from elsewhere that means something else here: an error naming the
    equivalent, not argparse's bare "unrecognized arguments"."""

    def __init__(self, option_strings, dest, message: str, **kwargs):  # type: ignore[no-untyped-def]
        self.message = message
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="*", help=argparse.SUPPRESS,
                         default=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        parser.error(f"{option_string}: {self.message}")


def reject_flag(parser: argparse.ArgumentParser, flag: str, message: str) -> None:
    """Make `flag` (with any values) an error that says `message` (the equivalent to use)."""
    parser.add_argument(flag, action=_Rejected, message=message)


class _OneOf(argparse.Action):
    """A flag whose value must be one of a few names that all mean what nnssl does anyway
    (nnU-Net's and the reference's default class names); any other name is an error saying
    how to get the intended effect here."""

    def __init__(self, option_strings, dest, accepted: Sequence[str], what: str, otherwise: str,  # type: ignore[no-untyped-def]
                 **kwargs):
        self.accepted, self.what, self.otherwise = tuple(accepted), what, otherwise
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        if values not in self.accepted:
            parser.error(f"{option_string} {values}: nnssl has one {self.what}, named {', '.join(self.accepted)}; "
                         f"{self.otherwise}")
        setattr(namespace, self.dest, values)


def add_one_of(parser: argparse.ArgumentParser, flag: str, accepted: Sequence[str], what: str, otherwise: str) -> None:
    """`flag NAME` where NAME must be one of `accepted` (see `_OneOf`)."""
    parser.add_argument(flag, action=_OneOf, accepted=accepted, what=what, otherwise=otherwise, default=accepted[0],
                        metavar="NAME", help=f"the {what} (nnssl has one; accepted for nnU-Net's and the reference's "
                                             f"commands): {', '.join(accepted)}")


def per_configuration(values: Sequence[int], configurations: Sequence[str], flag: str) -> list[int]:
    """nnU-Net's `-np 8 4` with `-c onemmiso median`: one value per configuration, or one for all."""
    from nnssl.errors import NnsslError

    if len(values) == 1:
        return [values[0]] * len(configurations)
    if len(values) != len(configurations):
        raise NnsslError(f"{flag} {' '.join(map(str, values))}: give one value, or one per configuration "
                         f"(-c {' '.join(configurations)}: {len(configurations)} values)")
    return list(values)


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
