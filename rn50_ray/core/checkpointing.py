"""A rank's checkpoints through its TrainContext: `report` (every rank reports, rank 0 writes the training state),
`resume` (the newest readable checkpoint into the Trainer) and rank 0's call on a preemption notice."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rn50_ray.core import checkpoint as ckpt
from rn50_ray.core.context import TrainContext
from rn50_ray.core.run_plan import RunPlan
from rn50_ray.core.trainer import Trainer


def preemption_checkpoint(ctx: TrainContext, notice: dict[str, Any], last_report_s: float, step: int) -> bool:
    """Rank 0's call on a drain notice: checkpoint now, unless the deadline is nearer than a checkpoint takes."""
    left = notice.get("seconds_left")
    nodes = ", ".join(notice.get("nodes", [])) or "a node"
    if left is not None and left < last_report_s:
        ctx.log(f"preemption: {nodes} draining in {left:.0f} s, sooner than a checkpoint takes ({last_report_s:.0f} s)")
        return False
    when = f" in {left:.0f} s" if left is not None else ""
    ctx.log(f"preemption: {nodes} draining{when}; checkpointing at step {step}")
    return True


def resume(ctx: TrainContext, trainer: Trainer, path: str, plan: RunPlan) -> None:
    """The newest readable checkpoint from `path` on into the trainer, and what it means for this start (a resize)."""
    state, path, stack = ckpt.load_first_readable(ctx, path)
    with stack:
        trainer.load_state_dict(state, keep_hyperparameters=ctx.from_init)
    if ctx.from_init:
        ctx.log(f"starting from another run's checkpoint {path}, with this run's hyperparameters")
    p = trainer.progress
    ctx.log(f"resumed from {path}: epoch {p.epoch}, step {p.step} ({p.step_in_epoch} into the epoch)")
    if p.world_size and p.world_size != ctx.world_size:
        p.resizes.append({"step": p.step, "old": p.world_size, "new": ctx.world_size})
        ctx.log(
            f"resize: world size {p.world_size} -> {ctx.world_size} at step {p.step}; {plan.batch.describe()}; "
            f"the epoch goes on with the images it has not trained yet"
        )


def report(ctx: TrainContext, trainer: Trainer, metrics: dict[str, Any], best: bool = False) -> None:
    """Every rank reports (a barrier under Ray); rank 0 writes the training state. A new best val top-1 is
    also kept apart, as `best_<name>`, beyond the newest-K pruning. Rank 0 logs what the checkpoint cost: the
    write to local staging, then storing it (Ray's upload to run.storage and its registration)."""
    name = ckpt.checkpoint_name(trainer.progress.epoch, trainer.progress.step)
    if ctx.world_rank != 0:
        ctx.report(metrics, None, name)
        return
    t0 = time.perf_counter()
    with ckpt.staging_dir() as tmp:
        ckpt.save_checkpoint(tmp, trainer.state_dict(), trainer.cfg.to_yaml())
        staged, size = time.perf_counter() - t0, sum(f.stat().st_size for f in Path(tmp).iterdir())
        if best:
            ctx.save_best(tmp, name)
        ctx.report(metrics, tmp, name)
    stored = time.perf_counter() - t0 - staged
    ctx.log(f"checkpoint {name}: {size / 1e6:.0f} MB, staged in {staged:.1f} s, stored in {stored:.1f} s")
