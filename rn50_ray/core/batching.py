"""The batch plan: how one optimizer step's global batch splits over any number of ranks.

The global batch N is fixed by the recipe. At world size W, rank r trains on the contiguous slice
[offset(r), offset(r) + share(r)) of the step's N images: shares differ by at most one image (N % W ranks
take one more), so every W from 1 to N is allowed and the step is built from the same images whatever W
is. Each rank splits its share into the fewest micro-batches of at most `max_micro` images (gradient
accumulation), so memory stays bounded at every W.

DDP averages gradients over ranks, so a rank weights each image's loss by W / N (`loss_weight`): the sum
over ranks of the averaged gradients is then the gradient of the mean loss over the N images, the update a
single process makes on the same global batch. Pure Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    global_size: int  # images per optimizer step, over all ranks
    world_size: int
    max_micro: int  # batch.per_worker: the largest micro-batch a rank runs at once

    def __post_init__(self) -> None:
        if not 1 <= self.world_size <= self.global_size:
            raise ValueError(f"world size {self.world_size}: expected 1 to batch.global_size ({self.global_size})")
        if self.max_micro < 1:
            raise ValueError(f"batch.per_worker: expected a number > 0, got {self.max_micro}")

    def share(self, rank: int) -> int:
        """Images rank `rank` trains on per step."""
        base, extra = divmod(self.global_size, self.world_size)
        return base + (rank < extra)

    def offset(self, rank: int) -> int:
        """Where rank `rank`'s slice starts in the step's global batch."""
        base, extra = divmod(self.global_size, self.world_size)
        return rank * base + min(rank, extra)

    def accum(self, rank: int) -> int:
        """Micro-batches per step on rank `rank` (gradient accumulation)."""
        return math.ceil(self.share(rank) / self.max_micro)

    def micro(self, rank: int) -> int:
        """The largest micro-batch on rank `rank`."""
        return math.ceil(self.share(rank) / self.accum(rank))

    @property
    def loss_weight(self) -> float:
        """Each image's loss weight, so that DDP's mean over ranks is the mean over the global batch."""
        return self.world_size / self.global_size

    def describe(self) -> str:
        """'global batch 2048 = 9 workers x 227-228 images (micro-batch 228, 1 accumulation)'."""
        low, high = self.share(self.world_size - 1), self.share(0)
        images = f"{low}" if low == high else f"{low}-{high}"
        return (
            f"global batch {self.global_size} = {self.world_size} workers x {images} images "
            f"(micro-batch {self.micro(0)}, {self.accum(0)} accumulation)"
        )
