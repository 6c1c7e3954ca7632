"""The run plan: every number a run derives from its config, worked out once, here.

From (config, number of train images, world size): the global batch, each rank's share, micro-batch and
accumulation (the BatchPlan), the steps per epoch, the peak LR (linear scaling), the train size per epoch
(progressive resizing) and the val size and val batch. The workers, the loaders, `fit` and `Trainer`,
dry-run, bench, evaluate and MLflow's plots all read a RunPlan; none works a number out again.

"The plan for W workers" is a pure function (`RunPlan.for_world`): an elastic resize, or a step trained by
however many workers take part in it, asks for the plan at that W. Pure Python: DALI's reader side and the
CLI's light paths import it without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

from rn50_ray.core.batching import BatchPlan
from rn50_ray.core.resolution import ResolutionSchedule


def global_batch(batch_cfg, max_workers: int) -> int:
    """batch.global_size, or where it is 0, batch.per_worker x the most workers the run may have."""
    return batch_cfg.global_size or batch_cfg.per_worker * max_workers


def peak_lr(lr_per_256: float, global_size: int) -> float:
    """The linear scaling rule: the peak LR for a global batch, from the LR per 256 images."""
    return lr_per_256 * global_size / 256


def val_size(data_cfg) -> int:
    """The val crop size: data.val_image_size, or where it is 0, data.image_size."""
    return data_cfg.val_image_size or data_cfg.image_size


class PlanError(ValueError):
    """The data cannot fill one global batch."""


@dataclass(frozen=True)
class RunPlan:
    global_batch: int  # images per optimizer step, over all ranks; fixed at every world size
    max_micro: int  # batch.per_worker: the largest micro-batch a rank runs at once
    train_images: int  # images in an epoch (after bad files are left out)
    epochs: int
    lr_per_256: float
    sizes: ResolutionSchedule  # the train size of each epoch
    val_size: int
    val_batch: int
    world_size: int = 1

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches in an epoch: the rest of the permutation waits for the next epoch's."""
        return self.train_images // self.global_batch

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def peak_lr(self) -> float:
        return peak_lr(self.lr_per_256, self.global_batch)

    @cached_property
    def batch(self) -> BatchPlan:
        """How each step's global batch splits over this plan's world size."""
        return BatchPlan(self.global_batch, self.world_size, self.max_micro)

    def for_world(self, world_size: int) -> RunPlan:
        """The same run planned for `world_size` workers: only the batch split changes."""
        return dataclasses.replace(self, world_size=world_size)

    def describe(self) -> str:
        """The line a start logs: 'global batch 2048 = 8 workers x 256 images (...); 625 steps per epoch; peak
        LR 2.048; train size 224 px; val 224 px in batches of 256'."""
        return (
            f"{self.batch.describe()}; {self.steps_per_epoch} steps per epoch; peak LR {self.peak_lr:.4g}; "
            f"train size {self.sizes.describe(self.epochs)}; val {self.val_size} px in batches of {self.val_batch}"
        )

    def table(self, min_workers: int, max_workers: int) -> list[str]:
        """Dry-run's table: one row per world size of the elastic range."""
        rows = [f"{'workers':>8} | {'images per rank':>15} | {'micro-batch':>11} | {'accumulation':>12} | {'steps/epoch':>11}"]
        for w in range(min_workers, max_workers + 1):
            plan = self.for_world(w).batch
            low, high = plan.share(w - 1), plan.share(0)
            images = f"{high}" if low == high else f"{low}-{high}"
            rows.append(f"{w:>8} | {images:>15} | {plan.micro(0):>11} | {plan.accum(0):>12} | {self.steps_per_epoch:>11}")
        return rows


def plan_run(cfg, train_images: int | None, world_size: int = 1) -> RunPlan:
    """The plan of a Config for `train_images` images at `world_size` workers; None is the synthetic backend's
    data.synthetic_samples (at least one global batch). A PlanError when the images do not fill one global
    batch (the caller names the folder)."""
    batch = global_batch(cfg.batch, cfg.max_workers)
    if train_images is None:
        train_images = max(cfg.data.synthetic_samples, batch)
    if train_images < batch:
        raise PlanError(f"{train_images} images is less than one global batch ({batch}); lower batch.global_size")
    res = cfg.resolution
    sizes = ResolutionSchedule(cfg.data.image_size, res.start_size, res.start_epoch, res.end_epoch, res.multiple)
    return RunPlan(
        global_batch=batch,
        max_micro=cfg.batch.per_worker,
        train_images=train_images,
        epochs=cfg.schedule.epochs,
        lr_per_256=cfg.optim.lr_per_256,
        sizes=sizes,
        val_size=val_size(cfg.data),
        val_batch=cfg.data.val_batch or cfg.batch.per_worker,  # never more at once than a training micro-batch
        world_size=world_size,
    )
