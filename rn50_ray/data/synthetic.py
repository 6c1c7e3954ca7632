"""The `synthetic` backend: one random batch already on the device, served every step.

It measures the training step without any input cost, as NVIDIA's synthetic backend does.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rn50_ray.data import Loaders, Shard

SYNTHETIC_CLASSES = 1000


class SyntheticTrain:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, steps: int):
        self.images, self.labels, self.steps_per_epoch = images, labels, steps
        self.skipped = 0

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(start_step, self.steps_per_epoch):
            yield self.images, self.labels


class SyntheticVal:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batches: int):
        self.images, self.labels, self.n = images, labels, batches

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.n):
            yield self.images, self.labels


def make_synthetic_loaders(
    data_cfg,
    shard: Shard,
    per_rank: int,
    *,
    global_batch: int,
    seed: int,
    channels_last: bool,
    num_classes: int = SYNTHETIC_CLASSES,
) -> Loaders:
    g = torch.Generator().manual_seed(seed * 7919 + shard.rank)
    size = data_cfg.image_size
    images = torch.randn(per_rank, 3, size, size, generator=g).to(shard.device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (per_rank,), generator=g).to(shard.device)
    steps = max(data_cfg.synthetic_samples // global_batch, 1)
    notes = [f"data: synthetic backend, {steps} steps per epoch of {global_batch} images"]
    return Loaders(
        SyntheticTrain(images, labels, steps),
        SyntheticVal(images, labels, 1),
        num_classes,
        steps * global_batch,
        per_rank * shard.world_size,
        notes,
    )
