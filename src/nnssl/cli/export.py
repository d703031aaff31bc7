"""`nnssl_export`: turn a training run into a folder to share or to fine-tune from."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from nnssl.cli.common import add_verbose, make_parser, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("nnssl_export", "Write a shareable folder (slim checkpoint, adaptation plan, config, model card) "
                                    "from an nnssl_train run.")
    p.add_argument("source", type=Path,
                   help="a results folder (…/<Trainer>__<plans>__<config>[/fold_all]) or a checkpoint .pth")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder to write")
    p.add_argument("--include_method_state", action="store_true",
                   help="also keep the whole method (student, teacher, predictor / decoder) in the checkpoint")
    p.add_argument("--safetensors", action="store_true", help="also write the encoder weights as model.safetensors")
    add_verbose(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    def body(a: argparse.Namespace) -> int:
        from nnssl.export.share import export

        result = export(a.source, a.output, a.include_method_state, a.safetensors)
        print(f"exported {result.source} to {result.folder}:")
        for f in result.files:
            print(f"  {f.name}")
        return 0

    return run_cli(build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
