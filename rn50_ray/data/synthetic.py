"""The `synthetic` backend: one random batch already on the device, served every step.

It measures the training step without any input cost, as NVIDIA's synthetic backend does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from rn50_ray.core.batching import BatchPlan
from rn50_ray.core.seeds import seed_for
from rn50_ray.data.types import Batch, Loaders, Shard

SYNTHETIC_CLASSES = 1000


class SyntheticTrain:
    def __init__(self, make: Callable[[int], Batch], steps: int, size_at: Callable[[int], int]):
        self.make, self.size_at, self.steps_per_epoch = make, size_at, steps
        self.batch: tuple[int, Batch] | None = None  # (size, batch)
        self.skipped = 0

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        size = self.size_at(epoch)
        if self.batch is None or self.batch[0] != size:
            self.batch = (size, self.make(size))
        for _ in range(start_step, self.steps_per_epoch):
            yield self.batch[1]


class SyntheticVal:
    def __init__(self, batch: Batch):
        self.batch = batch

    def batches(self) -> Iterator[Batch]:
        yield self.batch


def make_synthetic_loaders(
    data_cfg,
    shard: Shard,
    plan: BatchPlan,
    *,
    seed: int,
    channels_last: bool,
    size_at: Callable[[int], int],
    val_batch: int,
    num_classes: int = SYNTHETIC_CLASSES,
) -> Loaders:
    share = plan.share(shard.rank)

    def make(size: int) -> Batch:
        g = torch.Generator().manual_seed(seed_for("synthetic", seed, shard.rank))
        images = torch.randn(share, 3, size, size, generator=g).to(shard.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, torch.randint(0, num_classes, (share,), generator=g).to(shard.device)

    steps = max(data_cfg.synthetic_samples // plan.global_size, 1)
    images, labels = make(data_cfg.val_image_size or data_cfg.image_size)
    val = images[:val_batch], labels[:val_batch]
    notes = [f"data: synthetic backend, {steps} steps per epoch of {plan.global_size} images"]
    return Loaders(
        SyntheticTrain(make, steps, size_at), SyntheticVal(val), num_classes, steps * plan.global_size, len(val[1]), notes
    )
