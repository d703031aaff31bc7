"""The batch the training step consumes (`Batch`), apart from the loader so that both the worker
side (`loader.py`) and the device side (`device_augment.py`) can build one."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One training batch. Masks mark voxels to exclude from losses (True = defaced)."""

    data: torch.Tensor  # [B, C, X, Y, Z] float32
    anonymization_mask: torch.Tensor  # [B, 1, X, Y, Z] bool
    image_ids: list[str]
    step: int

    def pin_memory(self) -> Batch:  # called by DataLoader's pin-memory thread
        return Batch(self.data.pin_memory(), self.anonymization_mask.pin_memory(), self.image_ids, self.step)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return Batch(self.data.to(device, non_blocking=non_blocking),
                     self.anonymization_mask.to(device, non_blocking=non_blocking), self.image_ids, self.step)
