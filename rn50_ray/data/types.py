"""What every input pipeline gives the training loop: the shapes shared by the backends."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

Batch = tuple[torch.Tensor, torch.Tensor]  # normalized float images on the device (N, 3, H, W), int64 labels


@dataclass(frozen=True)
class Shard:
    rank: int
    world_size: int
    device: torch.device


class TrainBatches(Protocol):
    steps_per_epoch: int
    skipped: int  # undecodable images dropped on the fly (--skip-bad-images, pytorch backend)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This rank's batches of steps start_step.. of `epoch`, one per optimizer step."""


class ValBatches(Protocol):
    def batches(self) -> Iterator[Batch]:
        """This rank's share of the val split, once."""


@dataclass
class Loaders:
    train: TrainBatches
    val: ValBatches
    num_classes: int
    train_size: int
    val_size: int
    notes: list[str] = field(default_factory=list)  # lines for the log
    excluded: int = 0  # undecodable files left out before training (--skip-bad-images)
    backend: str = ""  # the resolved backend
    classes: tuple[str, ...] = ()  # class folder names, by label
    class_names: dict[str, str] = field(default_factory=dict)  # folder -> readable name (the data's classes.json)
