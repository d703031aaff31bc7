"""`nnssl_create_dataset` and `nnssl_generate_phantoms`: from images on disk to pretrain_data.json."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from nnssl.cli.common import add_shape, add_verbose, make_parser, positive_int, reject_flag, run_cli

# -n is a name in nnssl, as in nnU-Net (nnssl_create_dataset -n NAME); counts have long flags
RENAMED_N = "in nnssl, as in nnU-Net, -n is a name; the number of volumes is --num_volumes N"


def format_summary(path: Path, summary: dict) -> str:
    """Human-readable lines for `Collection.summary()`."""
    modalities = ", ".join(f"{name} {count}" for name, count in summary["modalities"].items())
    lines = [
        f"wrote {path}",
        f"  collection   {summary['collection_name']} (index {summary['collection_index']})",
        f"  datasets     {summary['datasets']}",
        f"  subjects     {summary['subjects']}",
        f"  sessions     {summary['sessions']}",
        f"  images       {summary['images']}",
        f"  modalities   {modalities}",
        f"  masks        {summary['anatomy_masks']} anatomy, {summary['anonymization_masks']} anonymization",
    ]
    unknown = summary["modalities"].get("unknown", 0)
    if unknown:
        lines.append(f"  note: {unknown} image(s) have modality 'unknown' (no known suffix such as _T1w in the "
                     "file name); pass --modality to set it")
    return "\n".join(lines)


def build_create_parser() -> argparse.ArgumentParser:
    p = make_parser("nnssl_create_dataset",
                    "Write $nnssl_raw/DatasetXXX_NAME/pretrain_data.json describing a BIDS tree or a flat folder "
                    "of images. Images are not copied. See documentation/creating_a_dataset.md.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-i", dest="source", type=Path,
                        help="folder with the images: a BIDS dataset, a folder of BIDS datasets, or a flat folder")
    source.add_argument("--openmind", type=Path, default=None, metavar="DIR",
                        help="the OpenMind download folder (openneuro_metadata.csv and OpenMind/); see "
                             "documentation/openmind.md")
    p.add_argument("-d", dest="dataset_id", type=int, required=True, help="dataset id (0-999)")
    p.add_argument("-n", dest="name", required=True, help="dataset name (letters, digits, '_' and '-')")
    p.add_argument("--layout", choices=("auto", "bids", "flat"), default="auto",
                   help="folder layout; auto = bids when sub-* folders exist (at the top or one level down)")
    p.add_argument("--modality", default=None,
                   help="modality of every image of a flat folder (e.g. T1w, ct); default: the file name's "
                        "suffix when known, else 'unknown'")
    p.add_argument("--max_iqs", type=float, default=None,
                   help="with --openmind: leave out images whose image_quality_score is above this (or missing); "
                        "lower is better. To keep every image and filter per run instead: nnssl_train --set "
                        "loader.max_iqs=X")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pretrain_data.json")
    add_verbose(p)
    return p


def create_dataset_main(argv: Sequence[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        from nnssl.errors import NnsslError

        if args.openmind is not None:
            from nnssl.data.openmind import create_openmind_dataset

            if args.layout != "auto" or args.modality is not None:
                raise NnsslError("--layout and --modality describe -i folders; OpenMind's table gives both")
            path, collection, left_out = create_openmind_dataset(args.openmind, args.dataset_id, args.name,
                                                                 args.overwrite, args.max_iqs)
            print(format_summary(path, collection.summary()))
            if args.max_iqs is not None:
                print(f"  left out     {left_out} image(s) with an image_quality_score above {args.max_iqs} or none")
            return 0
        if args.max_iqs is not None:
            raise NnsslError("--max_iqs filters OpenMind's quality scores: it goes with --openmind")
        from nnssl.data.builders import create_dataset

        path, collection = create_dataset(args.source, args.dataset_id, args.name, layout=args.layout,
                                          modality=args.modality, overwrite=args.overwrite)
        print(format_summary(path, collection.summary()))
        return 0

    return run_cli(build_create_parser(), body, argv)


def build_phantoms_parser() -> argparse.ArgumentParser:
    p = make_parser("nnssl_generate_phantoms",
                    "Generate synthetic anatomy-like MR/CT phantoms as a BIDS tree (label maps under "
                    "derivatives/labels, cases.json with class labels); with -d and --name also create the "
                    "dataset from it.")
    p.add_argument("-o", dest="out_dir", type=Path, required=True, help="output folder (empty or earlier phantoms)")
    p.add_argument("--num_volumes", type=positive_int, default=20, help="number of volumes")
    reject_flag(p, "-n", RENAMED_N + " (the dataset name that goes with -d is --name)")
    add_shape(p, (64, 64, 64), "voxels at 1 mm (the field of view in mm); other spacings get round(fov/spacing) "
                               "voxels")
    p.add_argument("--modality", choices=("MR", "CT", "mixed"), default="mixed", help="image kind")
    p.add_argument("--num_classes", type=int, default=2,
                   help="number of key-organ shapes (1-4: sphere, cuboid, rod, pair) = class labels")
    p.add_argument("--key_organ_scale", type=float, default=1.0,
                   help="key-organ radius factor, 0.5-2 (1.5 makes the shape, the class, easier to see)")
    p.add_argument("--paired_organs", action="store_true",
                   help="add twin organs of one tissue told apart only by the side of a landmark organ (labels 7 "
                        "and 8, listed as context_labels in cases.json): the dense context task of nnssl_evaluate")
    p.add_argument("--protocol_set", choices=("search", "test"), default=None,
                   help="write the dense-probe protocol's labeled set (fixed generator settings and seed, "
                        "documentation/evaluation.md); the generator options may not be given with it")
    p.add_argument("--isotropic", action="store_true", help="1 mm isotropic spacing instead of random anisotropic")
    p.add_argument("--no_random_orientation", action="store_true",
                   help="identity direction matrix instead of a random axis permutation/flip")
    p.add_argument("--no_anatomy_masks", action="store_true", help="do not write <stem>_anatmask files")
    p.add_argument("--seed", type=int, default=0, help="random seed (volumes are deterministic per seed)")
    p.add_argument("-np", dest="num_processes", type=int, default=1, help="worker processes")
    p.add_argument("-d", dest="dataset_id", type=int, default=None,
                   help="also create dataset DatasetXXX_<name> from the output folder (needs nnssl_raw)")
    p.add_argument("--name", dest="dataset_name", default=None, help="dataset name used with -d")
    p.add_argument("--overwrite", action="store_true", help="with -d: replace an existing pretrain_data.json")
    add_verbose(p)
    return p


def generate_phantoms_main(argv: Sequence[str] | None = None) -> int:
    parser = build_phantoms_parser()

    def body(args: argparse.Namespace) -> int:
        from nnssl.data.phantom_files import write_phantom_collection
        from nnssl.data.phantoms import PhantomConfig
        from nnssl.errors import NnsslError

        if (args.dataset_id is None) != (args.dataset_name is None):
            raise NnsslError("-d and --name go together: pass both to create the dataset, or neither")
        if args.protocol_set:
            from dataclasses import replace

            config = replace(_protocol_set(parser, args.protocol_set, argv), anatomy_masks=not args.no_anatomy_masks)
        else:
            config = PhantomConfig(num_volumes=args.num_volumes, shape=tuple(args.shape), modality=args.modality,
                                   anisotropic=not args.isotropic,
                                   random_orientation=not args.no_random_orientation,
                                   anatomy_masks=not args.no_anatomy_masks, num_classes=args.num_classes,
                                   key_organ_scale=args.key_organ_scale, seed=args.seed,
                                   paired_organs=args.paired_organs)
        if args.dataset_id is not None:  # fail on a bad id/name or a missing nnssl_raw before the work
            from nnssl.paths import dataset_folder_name, nnssl_raw

            target = nnssl_raw() / dataset_folder_name(args.dataset_id, args.dataset_name) / "pretrain_data.json"
            if target.exists() and not args.overwrite:
                raise NnsslError(f"{target} already exists; pass --overwrite to replace it")
        manifest = write_phantom_collection(args.out_dir, config, num_processes=args.num_processes)
        classes = {c: manifest.class_labels().count(c) for c in range(config.num_classes)}
        print(f"wrote {len(manifest.cases)} phantoms to {manifest.out_dir} (volumes per class: {classes}); "
              f"case list: {manifest.cases_json}")
        if args.dataset_id is not None:
            from nnssl.data.builders import create_dataset

            path, collection = create_dataset(manifest.out_dir, args.dataset_id, args.dataset_name,
                                              layout="bids", overwrite=args.overwrite)
            print(format_summary(path, collection.summary()))
        return 0

    return run_cli(parser, body, argv)


# generator options a protocol set fixes
_PROTOCOL_FIXED = ("num_volumes", "shape", "modality", "num_classes", "key_organ_scale", "paired_organs", "isotropic",
                   "no_random_orientation", "seed")


def _protocol_set(parser: argparse.ArgumentParser, which: str, argv: Sequence[str] | None):
    import sys

    from nnssl.errors import NnsslError
    from nnssl.evaluation.protocol import protocol_set_config

    tokens = {t.split("=", 1)[0] for t in (sys.argv[1:] if argv is None else argv)}
    flags = {a.dest: a.option_strings for a in parser._actions}
    given = [flags[d][0] for d in _PROTOCOL_FIXED if tokens & set(flags[d])]
    if given:
        raise NnsslError(f"--protocol_set {which} fixes {', '.join(given)}; drop them (the set's settings: "
                         "documentation/evaluation.md)")
    return protocol_set_config(which)


if __name__ == "__main__":
    raise SystemExit(create_dataset_main())
