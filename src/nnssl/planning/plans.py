"""Typed `nnsslPlans.json`: the reference's fields plus ours (patch/batch defaults with reasons).

Unknown keys of a plans file (e.g. written by the reference or edited by a user) are kept and
written back; a missing configuration is an error that lists the valid ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nnssl.errors import InvalidInput, NnsslError
from nnssl.io_utils import read_json, write_json


@dataclass
class ConfigurationPlan:
    data_identifier: str
    preprocessor_name: str
    spacing_style: str
    spacing: list[float] | None
    normalization_schemes: list[str]
    use_mask_for_norm: list[bool]
    resampling_fn_data: str
    resampling_fn_data_kwargs: dict[str, Any]
    resampling_fn_mask: str
    resampling_fn_mask_kwargs: dict[str, Any]
    patch_size: list[int]
    batch_size: int = 8
    median_shape_after_resampling: list[float] | None = None
    reasoning: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConfigurationPlan:
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = [n for n in ("data_identifier", "spacing", "patch_size") if n not in d]
        if missing:
            raise InvalidInput(f"configuration lacks {missing}")
        known = {k: v for k, v in d.items() if k in names}
        known.setdefault("preprocessor_name", "DefaultPreprocessor")
        known.setdefault("spacing_style", "onemmiso")
        known.setdefault("normalization_schemes", ["ZScoreNormalization"])
        known.setdefault("use_mask_for_norm", [False])
        for key in ("resampling_fn_data", "resampling_fn_mask"):
            known.setdefault(key, "resample_data_or_seg_to_shape")
            known.setdefault(key + "_kwargs", {})
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})


@dataclass
class Plans:
    dataset_name: str
    plans_name: str
    original_median_spacing_after_transp: list[float]
    image_reader_writer: str
    transpose_forward: list[int]
    transpose_backward: list[int]
    experiment_planner_used: str
    configurations: dict[str, ConfigurationPlan]
    normalization_per_modality: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def configuration(self, name: str) -> ConfigurationPlan:
        if name not in self.configurations:
            raise NnsslError(f"configuration {name!r} is not in the plans {self.plans_name} of "
                             f"{self.dataset_name}; valid: {', '.join(sorted(self.configurations))}")
        return self.configurations[name]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "configurations")}
        d["configurations"] = {k: v.to_dict() for k, v in self.configurations.items()}
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> Plans:
        names = {f.name for f in fields(cls)} - {"extra"}
        required = names - {"normalization_per_modality"}
        missing = sorted(required - set(d))
        if missing:
            raise InvalidInput(f"{source}: plans lack the keys {missing}; re-run nnssl_plan_experiment")
        configs = {}
        for name, c in d["configurations"].items():
            try:
                configs[name] = ConfigurationPlan.from_dict(c)
            except InvalidInput as e:
                raise InvalidInput(f"{source}: configurations.{name}: {e}") from e
        known = {k: v for k, v in d.items() if k in names and k != "configurations"}
        return cls(**known, configurations=configs, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def load(cls, path: str | Path) -> Plans:
        return cls.from_dict(read_json(path), source=str(path))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def plan_hash(self, configuration: str) -> str:
        """Changes whenever anything that shapes a preprocessed case changes (resume key)."""
        c = self.configuration(configuration).to_dict()
        relevant = {k: c.get(k) for k in ("spacing", "normalization_schemes", "use_mask_for_norm",
                                         "resampling_fn_data", "resampling_fn_data_kwargs",
                                         "resampling_fn_mask", "resampling_fn_mask_kwargs")}
        relevant["transpose_forward"] = self.transpose_forward
        relevant["normalization_per_modality"] = self.normalization_per_modality
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
