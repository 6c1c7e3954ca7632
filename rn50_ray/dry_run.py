"""`train --dry-run` and `tune --dry-run`: the resolved run and its batch plan at every world size in the
elastic range, printed before any cluster is paid for. Starts nothing: no Ray, no model, no data loader."""

from __future__ import annotations

from rn50_ray.config import Config
from rn50_ray.core.batching import BatchPlan, peak_lr
from rn50_ray.core.resolution import ResolutionSchedule
from rn50_ray.data.folder import check_batch_fits, check_dataset


def describe(cfg: Config) -> str:
    """The plan of a resolved config: data, schedule, resolution and one row per world size."""
    lines = []
    if cfg.data.backend == "synthetic":
        steps = max(cfg.data.synthetic_samples // cfg.batch.global_size, 1)
        lines.append(f"data: synthetic, {steps * cfg.batch.global_size} images per epoch")
    else:
        train, val = check_dataset(cfg.data.path)
        steps = check_batch_fits(train, cfg.batch.global_size)
        lines.append(f"data: {cfg.data.path}: {len(train)} train / {len(val)} val images, {len(train.classes)} classes")
    sizes = ResolutionSchedule.from_config(cfg.data.image_size, cfg.resolution)
    sched = cfg.schedule
    warm = f"peak at epoch {sched.peak_epoch:g}" if sched.kind == "triangular" else f"{sched.warmup_epochs:g} warmup epochs"
    lines += [
        f"schedule: {sched.epochs} epochs of {steps} steps, {sched.kind} LR ({warm}), peak LR "
        f"{peak_lr(cfg.optim.lr_per_256, cfg.batch.global_size):.4g} ({cfg.optim.lr_per_256:g} per 256 images)",
        f"train size: {sizes.describe(sched.epochs)}; val size {cfg.data.val_image_size or cfg.data.image_size} px"
        f"{', flip TTA' if cfg.eval.flip_tta else ''}",
        f"batch plan: global batch {cfg.batch.global_size}, micro-batches of at most {cfg.batch.per_worker} "
        f"(scale.workers {cfg.scale.workers})",
        f"{'workers':>8} | {'images per rank':>15} | {'micro-batch':>11} | {'accumulation':>12} | {'steps/epoch':>11}",
    ]
    for w in range(cfg.min_workers, cfg.max_workers + 1):
        plan = BatchPlan(cfg.batch.global_size, w, cfg.batch.per_worker)
        low, high = plan.share(w - 1), plan.share(0)
        images = f"{high}" if low == high else f"{low}-{high}"
        lines.append(f"{w:>8} | {images:>15} | {plan.micro(0):>11} | {plan.accum(0):>12} | {steps:>11}")
    return "\n".join(lines)
