"""Everything a training run needs before its first step, built from the run options.

Reads the plans and the preprocessed case list, draws (or reuses) the subject split, completes
the training configuration with the plan's geometry (patch and batch size, unless the trainer
sets them), builds the method, the optimizer and the loaders, and names the output folders in
the reference layout:
`$nnssl_results/DatasetXXX_Name/<Trainer>__<plans>__<config>/fold_all/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from nnssl import paths
from nnssl.dataloading.augment import AugmentConfig
from nnssl.dataloading.case_index import CaseIndex
from nnssl.dataloading.dataset import load_cases, make_or_load_splits, split_cases
from nnssl.dataloading.loader import LoaderConfig, resolve_augment_on_device
from nnssl.errors import NnsslError
from nnssl.log import get_logger
from nnssl.methods.base import PretrainingMethod
from nnssl.planning.plans import Plans
from nnssl.training.config import TrainingConfig, with_geometry
from nnssl.training.distributed import DistInfo
from nnssl.training.options import RunOptions

logger = get_logger(__name__)


@dataclass
class DataSetup:
    dataset: str
    plans: Plans
    train_cases: CaseIndex
    val_cases: CaseIndex


@dataclass
class RunContext:
    options: RunOptions
    config: TrainingConfig
    dist: DistInfo
    data: DataSetup
    method: PretrainingMethod  # an nn.Module, on the device
    optimizer: torch.optim.Optimizer
    run_folder: Path  # .../<Trainer>__<plans>__<config>
    output_folder: Path  # run_folder / fold_all
    geometry_notes: list[str] = field(default_factory=list)  # where patch and batch size came from

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.dist.world_size

    @property
    def batch_size(self) -> int:
        assert self.config.batch_size is not None  # with_geometry resolved it
        return self.config.batch_size


def pick_dataset(dataset: str | int | None) -> str:
    """The dataset folder name; with none given, the only preprocessed one."""
    if dataset is not None:
        return paths.resolve_dataset_name(dataset, roots=(paths.PREPROCESSED,))
    found = paths.list_datasets(paths.PREPROCESSED)
    if len(found) == 1:
        return found[0]
    if not found:
        raise NnsslError(f"no preprocessed dataset in {paths.nnssl_preprocessed()}; run "
                         "nnssl_plan_and_preprocess -d ID first, or name the dataset: nnssl_train ID ...")
    raise NnsslError(f"{len(found)} preprocessed datasets, name one: nnssl_train ID ... (found: {', '.join(found)})")


def run_folders(dataset: str, trainer: str, plans: str, configuration: str) -> tuple[Path, Path]:
    run = paths.nnssl_results() / dataset / f"{trainer}__{plans}__{configuration}"
    return run, run / "fold_all"


def load_plans(options: RunOptions) -> DataSetup:
    """The dataset and its plans (`-p`), without the case list (for `--print_config`)."""
    from nnssl.preprocessing.runner import load_plans as read_plans

    dataset = pick_dataset(options.dataset)
    plans = read_plans(paths.preprocessed_dataset_dir(dataset), options.plans)
    plans.configuration(options.configuration)  # raises with the valid names
    return DataSetup(dataset, plans, CaseIndex.from_records([]), CaseIndex.from_records([]))


def load_data(options: RunOptions, seed: int, max_iqs: float | None = None) -> DataSetup:
    """The plans and the train/val cases. The split is drawn over every subject, so filtering by
    image-quality score (`max_iqs`, `--set loader.max_iqs=X`) never changes `splits_final.json`."""
    from nnssl.preprocessing.runner import preprocessed_collection_path

    data = load_plans(options)
    pre = paths.preprocessed_dataset_dir(data.dataset)
    collection = preprocessed_collection_path(pre, data.plans, options.configuration)
    if not collection.is_file():
        raise NnsslError(f"{collection} does not exist: configuration {options.configuration!r} of {options.plans} is "
                         f"not preprocessed; run nnssl_preprocess -d {data.dataset} -c {options.configuration} "
                         f"-p {options.plans}")
    cases = load_cases(collection)
    splits = make_or_load_splits(cases, pre / "splits_final.json", seed=seed)
    if max_iqs is not None:
        cases = _filter_by_iqs(cases, collection, max_iqs)
    data.train_cases, data.val_cases = split_cases(cases, splits)
    if not data.train_cases:
        raise NnsslError(f"loader.max_iqs={max_iqs} leaves no training case in {collection}; raise it")
    return data


def _filter_by_iqs(cases: CaseIndex, collection: Path, max_iqs: float) -> CaseIndex:
    from nnssl.data.collection import Collection
    from nnssl.data.openmind import select_by_iqs

    kept, above, unscored = select_by_iqs(Collection.load(collection), max_iqs)
    if unscored == len(cases):
        raise NnsslError(f"loader.max_iqs={max_iqs}, but no image in {collection} has an image_quality_score "
                         "(create the dataset with nnssl_create_dataset --openmind, or drop the setting)")
    logger.info("loader.max_iqs=%s: training on %d of %d images (%d scored above, %d without a score)",
                max_iqs, len(kept), len(cases), above, unscored)
    return cases.subset([i for i, image_id in enumerate(cases.image_ids()) if image_id in kept])


def loader_config(config: TrainingConfig, options: RunOptions, local_batch: int, validation: bool = False,
                  device: torch.device | str | None = None) -> LoaderConfig:
    """Training batches are augmented (on `device` when `loader.augment_on_device` resolves to on
    for it: by default on CUDA); validation batches are plain crops with their own seed, built in
    the training process."""
    assert config.patch_size is not None  # with_geometry resolved it
    return LoaderConfig(patch_size=config.patch_size, batch_size=local_batch,
                        num_workers=0 if validation else options.num_workers,
                        foreground_probability=config.loader.foreground_probability,
                        augment=AugmentConfig.disabled() if validation else config.augment,
                        seed=config.seed + (1 if validation else 0),
                        augment_on_device=False if validation else resolve_augment_on_device(
                            config.loader.augment_on_device, device))


def check_batch_split(config: TrainingConfig, world_size: int) -> None:
    parts = world_size * config.grad_accumulation
    if config.batch_size is not None and config.batch_size % parts:
        what = f"{world_size} processes" + (f" x {config.grad_accumulation} micro-batches"
                                           if config.grad_accumulation > 1 else "")
        raise NnsslError(f"the global batch size {config.batch_size} of {config.trainer_name} does not split "
                         f"evenly over {what}; use a _BS<N> suffix divisible by {parts}")


def build_optimizer(method: PretrainingMethod, config: TrainingConfig) -> torch.optim.Optimizer:
    from nnssl.methods.schedules import lr_at, wd_at

    schedule = config.schedule_config()
    # fused: one kernel over all parameters instead of ~10 elementwise passes per tensor
    # (exact same update; on CPU it measured ~1% of an I-JEPA step, on CUDA it saves launches)
    device = next(iter(method.parameters())).device
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(method.parameter_groups(wd_at(0, schedule)), lr=lr_at(0, schedule),
                             betas=config.optim.betas, fused=fused)


def resolve_run_config(config: TrainingConfig, data: DataSetup, configuration: str
                       ) -> tuple[TrainingConfig, list[str]]:
    """`config` with the plan's geometry filled in, and where patch and batch size came from."""
    plan = data.plans.configuration(configuration)
    return with_geometry(config, plan.patch_size, plan.batch_size, f"{data.plans.plans_name}.json ({configuration})")


def build_context(options: RunOptions, config: TrainingConfig, dist: DistInfo) -> RunContext:
    """Read, resolve and build everything (no training, no writes)."""
    from nnssl.methods.factory import build_method

    data = load_data(options, config.seed, config.loader.max_iqs)
    config, notes = resolve_run_config(config, data, options.configuration)
    check_batch_split(config, dist.world_size)
    method = build_method(config, input_channels=1).to(dist.device)
    optimizer = build_optimizer(method, config)
    run_folder, output_folder = run_folders(data.dataset, config.trainer_name, options.plans, options.configuration)
    return RunContext(options, config, dist, data, method, optimizer, run_folder, output_folder, notes)
