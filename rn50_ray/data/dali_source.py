"""The training samples of the DALI backend, read by DALI's parallel external source in its own processes.

DALI's file reader shards by world rank in an order of its own, and its random crops depend on the stream,
not on the image. This source follows `order` instead, as the pytorch backend does: sample k of step t is
image step_indices(t)[k], read as bytes, with the crop window and mirror flag of (seed, epoch, index) and the
epoch's train size. DALI then decodes only that window (ROI decoding), resizes and normalizes it.

Imports numpy and PIL only (PIL to read the image's size from its header): DALI starts its reader processes
with `spawn`, and each imports this module.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from rn50_ray.core.batching import BatchPlan
from rn50_ray.data import order


class TrainSource:
    """A per-sample callback for `fn.external_source(parallel=True, batch=False)`. Epoch `first_epoch`
    starts at `first_step`; DALI counts epochs after it by its own epoch index (one per StopIteration)."""

    def __init__(
        self,
        files: list[str],
        labels: list[int],
        plan: BatchPlan,
        rank: int,
        *,
        steps: int,
        seed: int,
        area_min: float,
        size_at: Callable[[int], int],
        first_epoch: int,
        first_step: int,
    ):
        self.files, self.labels, self.plan, self.rank = files, labels, plan, rank
        self.steps, self.seed, self.area_min, self.size_at = steps, seed, area_min, size_at
        self.first_epoch, self.first_step = first_epoch, first_step
        self._order: tuple[int, np.ndarray] | None = None

    def position(self, epoch_idx: int, iteration: int) -> tuple[int, int]:
        """(epoch, step) of DALI's iteration `iteration` of its epoch `epoch_idx`."""
        return self.first_epoch + epoch_idx, (self.first_step if epoch_idx == 0 else 0) + iteration

    def index(self, epoch: int, step: int, k: int) -> int:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, order.epoch_order(len(self.files), self.seed, epoch))
        return int(order.step_indices(self._order[1], self.plan, self.rank, step)[k])

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        epoch, step = self.position(info.epoch_idx, info.iteration)
        if step >= self.steps:
            raise StopIteration
        i = self.index(epoch, step, info.idx_in_batch)
        path = self.files[i]
        data = np.fromfile(path, dtype=np.uint8)
        try:
            width, height = Image.open(io.BytesIO(data)).size  # the header only
        except Exception as e:  # PIL raises many types; any means the file is not an image it can read
            raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
        c = order.random_resized_crop(self.seed, epoch, i, width, height, self.area_min)
        return (
            data,
            np.array([self.labels[i]], dtype=np.int64),
            np.array([c.left, c.top], dtype=np.float32),
            np.array([c.width, c.height], dtype=np.float32),
            np.array([c.flip], dtype=np.int32),
            np.array([self.size_at(epoch)], dtype=np.float32),
            np.array([i], dtype=np.int64),
        )
