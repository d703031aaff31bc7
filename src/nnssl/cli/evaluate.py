"""`nnssl_evaluate`: did pretraining work? Frozen features of an exported encoder vs random init.

Reports RankMe / feature std (collapse check), logistic-regression probes on mean-pooled
features (class label per volume), on token features (label maps) and on the tokens of the
context labels (structures of one tissue told apart by context), and a learning curve (probe
accuracy vs fraction of labeled training cases), each for the checkpoint's encoder and for the
same architecture at random initialisation, next to encoder-free baselines (a token's own
voxels; a context oracle). `-protocol dense` fixes every probe setting to the dense-probe
protocol. Writes evaluation.json and evaluation.png. Labeled-set format and every output field:
documentation/evaluation.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from nnssl.cli.common import DEVICE_HELP, add_verbose, device, make_parser, positive_int, run_cli


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# the probe settings `-protocol dense` fixes (nnssl.evaluation.protocol.DENSE_PROBE)
PROTOCOL_FIXED = ("num_splits", "test_fraction", "C", "fractions", "token_label", "pooling", "token_readout",
                  "probe_cell", "max_tokens_per_case", "seed")


def build_parser() -> argparse.ArgumentParser:
    from nnssl.evaluation.probe import POOLINGS, TOKEN_READOUTS, ProbeConfig

    d = ProbeConfig()
    p = make_parser("nnssl_evaluate", __doc__)
    p.add_argument("checkpoint", type=Path, help="checkpoint_final.pth of a training run or of an nnssl_export folder")
    p.add_argument("--labeled", "-labeled", type=Path, required=True, dest="labeled",
                   help="folder with a cases.json listing images with class labels and/or label maps")
    p.add_argument("-o", type=Path, default=None, dest="output",
                   help="output folder for evaluation.json and evaluation.png (default: evaluation/ next to "
                        "the checkpoint)")
    p.add_argument("-device", type=device, default="cpu", help=f"torch device for feature extraction: {DEVICE_HELP}")
    p.add_argument("-batch_size", type=positive_int, default=4, help="volumes per forward pass")
    p.add_argument("-num_splits", type=positive_int, default=d.num_splits,
                   help="seeded train/test splits by case; reported numbers are their mean")
    p.add_argument("-test_fraction", type=float, default=d.test_fraction, help="share of cases held out per split")
    p.add_argument("-C", type=float, default=d.C, dest="C",
                   help="inverse L2 regularisation of the logistic regression (on standardised features)")
    p.add_argument("-fractions", type=float, nargs="+", default=list(d.fractions),
                   help="learning curve: shares of the training cases the probes are fitted on (1 is always added)")
    p.add_argument("-token_label", choices=("centre", "majority"), default=d.token_label,
                   help="label of a token: the label-map voxel at its cell's centre, or the majority in the cell")
    p.add_argument("-pooling", choices=POOLINGS, default=d.pooling,
                   help="volume probe features: mean = the final tokens' mean; layers = every depth's mean "
                        "(patch embedding, each block, final norm; ResEnc: each stage) concatenated")
    p.add_argument("-token_readout", choices=TOKEN_READOUTS, default=d.token_readout,
                   help="token and context probe features: final = the last depth's tokens; layers = every depth's "
                        "tokens concatenated (patch embedding, each block, final norm; ResEnc: each stage)")
    p.add_argument("-probe_cell", type=_non_negative_int, default=d.probe_cell,
                   help="token and context probes label cells of this many voxels per side (e.g. 8 for a ResEnc, "
                        "whose tokens are 32^3); 0 = the encoder's own token grid")
    p.add_argument("-max_tokens_per_case", type=positive_int, default=d.max_tokens_per_case,
                   help="token probe: token positions kept per case (seeded subset, same for every case); also the "
                        "most context tokens per case. Bounds memory: cases x this x features x 4 bytes per encoder")
    p.add_argument("--no_baselines", action="store_true",
                   help="skip the encoder-free baselines (own-cell intensity statistics and voxels, context oracle)")
    p.add_argument("-protocol", choices=("dense",), default=None,
                   help="fix every probe setting to the dense-probe protocol (documentation/evaluation.md); the "
                        "options it fixes may not be given with it")
    p.add_argument("-seed", type=_non_negative_int, default=d.seed,
                   help="seed of the splits, learning-curve subsets and token subsamples")
    p.add_argument("-random_seed", type=_non_negative_int, default=0,
                   help="seed of the randomly initialised reference encoder")
    p.add_argument("--no_plot", action="store_true", help="write evaluation.json only (no matplotlib)")
    add_verbose(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        from nnssl.evaluation.evaluate import evaluate_checkpoint
        from nnssl.evaluation.probe import ProbeConfig
        from nnssl.evaluation.report import JSON_NAME, PLOT_NAME, format_summary

        if args.protocol:
            probe = _protocol_probe(args, argv)
        else:
            probe = ProbeConfig(test_fraction=args.test_fraction, num_splits=args.num_splits, seed=args.seed, C=args.C,
                                fractions=tuple(args.fractions), token_label=args.token_label, pooling=args.pooling,
                                max_tokens_per_case=args.max_tokens_per_case, token_readout=args.token_readout,
                                probe_cell=args.probe_cell, baselines=not args.no_baselines)
        out = args.output or args.checkpoint.absolute().parent / "evaluation"
        result = evaluate_checkpoint(args.checkpoint, args.labeled, out, probe=probe, random_seed=args.random_seed,
                                     device=args.device, batch_size=args.batch_size, plot=not args.no_plot,
                                     protocol=args.protocol)
        print(format_summary(result))
        print(f"written: {out / JSON_NAME}" + ("" if args.no_plot else f", {out / PLOT_NAME}"))
        return 0

    return run_cli(build_parser(), body, argv)


def _protocol_probe(args: argparse.Namespace, argv: Sequence[str] | None):
    """The protocol's probe settings; any of them given on the command line is an error (a fixed
    protocol that silently took other values would not be the protocol)."""
    import sys
    from dataclasses import replace

    from nnssl.errors import InvalidInput
    from nnssl.evaluation.protocol import DENSE_PROBE

    tokens = {t.split("=", 1)[0] for t in (sys.argv[1:] if argv is None else argv)}
    flags = {a.dest: a.option_strings for a in build_parser()._actions}
    given = [f"{flags[d][0]}" for d in PROTOCOL_FIXED if tokens & set(flags[d])]
    if given:
        raise InvalidInput(f"-protocol dense fixes {', '.join(given)}; drop them (the protocol's values: "
                           "documentation/evaluation.md), or drop -protocol to choose your own")
    return replace(DENSE_PROBE, baselines=not args.no_baselines)


if __name__ == "__main__":
    raise SystemExit(main())
