"""Pretraining data loading: case index and splits, region-only patch reads, augmentation, workers.

Typical use (see documentation/data_loading.md):

    cases = load_cases(preprocessed / "pretrain_data__onemmiso.json")
    splits = make_or_load_splits(cases, preprocessed / "splits_final.json")
    train, val = split_cases(cases, splits)
    with PretrainLoader(train, LoaderConfig((160, 160, 160), batch_size=2), rank, world_size,
                        start_step=step) as loader:
        for batch in loader:
            batch = batch.to(device)   # a RawBatch (augmentation on the device) is augmented here
"""

from nnssl.dataloading.augment import AugmentConfig
from nnssl.dataloading.batch import Batch
from nnssl.dataloading.case_index import CaseIndex
from nnssl.dataloading.dataset import CaseRecord, load_cases, make_or_load_splits, split_cases
from nnssl.dataloading.device_augment import RawBatch
from nnssl.dataloading.loader import LoaderConfig, PretrainLoader, default_num_workers
from nnssl.dataloading.patches import CaseReadError
from nnssl.dataloading.sampling import SampleError

__all__ = [
    "AugmentConfig", "Batch", "CaseIndex", "CaseReadError", "CaseRecord", "LoaderConfig", "PretrainLoader",
    "RawBatch", "SampleError", "default_num_workers", "load_cases", "make_or_load_splits", "split_cases",
]
