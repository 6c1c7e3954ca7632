"""The `synthetic` backend: one random batch already on the device, served every step.

It measures the training step without any input cost, as NVIDIA's synthetic backend does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from rn50_ray.core.context import Batch, Loaders
from rn50_ray.core.run_plan import RunPlan
from rn50_ray.core.seeds import seed_for
from rn50_ray.data.types import Shard

SYNTHETIC_CLASSES = 1000


class SyntheticTrain:
    def __init__(self, make: Callable[[int, int], Batch], share: int, steps: int, size_at: Callable[[int], int]):
        self.make, self.share, self.size_at, self.steps_per_epoch = make, share, size_at, steps
        self.batch: tuple[int, int, Batch] | None = None  # (size, share, batch)
        self.skipped = 0

    def set_share(self, plan: RunPlan, rank: int) -> None:
        self.share = plan.batch.share(rank)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        size = self.size_at(epoch)
        if self.batch is None or self.batch[:2] != (size, self.share):
            self.batch = (size, self.share, self.make(size, self.share))
        for _ in range(start_step, self.steps_per_epoch):
            yield self.batch[2]


class SyntheticVal:
    def __init__(self, batch: Batch):
        self.batch = batch

    def set_share(self, rank: int, world_size: int) -> None:
        pass  # one fixed batch per rank

    def batches(self) -> Iterator[Batch]:
        yield self.batch


def make_synthetic_loaders(
    shard: Shard, plan: RunPlan, *, seed: int, channels_last: bool, num_classes: int = SYNTHETIC_CLASSES
) -> Loaders:
    def make(size: int, share: int) -> Batch:
        g = torch.Generator().manual_seed(seed_for("synthetic", seed, shard.rank))
        images = torch.randn(share, 3, size, size, generator=g).to(shard.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, torch.randint(0, num_classes, (share,), generator=g).to(shard.device)

    images, labels = make(plan.val_size, plan.val_batch)
    val = images[: plan.val_batch], labels[: plan.val_batch]
    notes = [f"data: synthetic backend, {plan.steps_per_epoch} steps per epoch of {plan.global_batch} images"]
    train = SyntheticTrain(make, plan.batch.share(shard.rank), plan.steps_per_epoch, plan.sizes.at)
    return Loaders(train, SyntheticVal(val), num_classes, plan.train_images, len(val[1]), notes)
