"""`train --dry-run` and `tune --dry-run`: the resolved run and its plan at every world size in the elastic
range, printed before any cluster is paid for. Starts nothing: no Ray, no model, no data loader. It reads the
data folder's manifest (building it once if the folder has none, as the run would)."""

from __future__ import annotations

from rn50_ray.config import Config
from rn50_ray.data.checks import plan_for, usable_dataset


def describe(cfg: Config, rescan: bool = False) -> str:
    """The plan of a resolved config: data, schedule, resolution and one row per world size."""
    dataset = usable_dataset(cfg, rescan=rescan)
    plan = plan_for(cfg, dataset)
    if dataset is None:
        lines = [f"data: synthetic, {plan.steps_per_epoch * plan.global_batch} images per epoch"]
    else:
        lines = [
            f"data: {cfg.data.path}: {len(dataset.train)} train / {len(dataset.val)} val images, "
            f"{len(dataset.train.classes)} classes"
        ]
    sched = cfg.schedule
    warm = f"peak at epoch {sched.peak_epoch:g}" if sched.kind == "triangular" else f"{sched.warmup_epochs:g} warmup epochs"
    lines += [
        f"schedule: {plan.epochs} epochs of {plan.steps_per_epoch} steps, {sched.kind} LR ({warm}), peak LR "
        f"{plan.peak_lr:.4g} ({plan.lr_per_256:g} per 256 images)",
        f"train size: {plan.sizes.describe(plan.epochs)}; val size {plan.val_size} px{', flip TTA' if cfg.eval.flip_tta else ''}",
        f"batch plan: global batch {plan.global_batch}, micro-batches of at most {plan.max_micro} "
        f"(scale.workers {cfg.scale.workers})",
        *plan.table(cfg.min_workers, cfg.max_workers),
    ]
    return "\n".join(lines)
