"""`fit`: resume, then per epoch train (`train_epoch`), evaluate and report, through a TrainContext.

As torchvision's `train_one_epoch`/`evaluate` and NVIDIA's `train`/`validate`: the step loop, its log
intervals, preemption and mid-epoch checkpoints are `train_epoch`'s; the epoch record is `epoch_record`'s.
Checkpoints through the context (`report`, `resume`, the preemption call) are core/checkpointing.py's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rn50_ray.core import checkpoint as ckpt
from rn50_ray.core.checkpointing import preemption_checkpoint, report, resume
from rn50_ray.core.context import Loaders, TrainBatches, TrainContext, jsonl
from rn50_ray.core.evaluation import evaluate
from rn50_ray.core.per_class import CONFUSION_FILE, PER_CLASS_FILE, matrix_to_csv, per_class_rows, rows_to_csv, worst
from rn50_ray.core.run_plan import RunPlan
from rn50_ray.core.seeds import seed_for
from rn50_ray.core.sync import FixedSync, StepSync
from rn50_ray.core.trainer import Trainer


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class Cadence:
    """When to checkpoint inside an epoch and when to ask about preemption, kept across epochs. Rank 0's clock
    and last report time decide; the interval's all-reduce carries its word, so every rank acts at the same step."""

    every_steps: int  # run.checkpoint_every_steps (0: at epoch ends only)
    poll_s: float  # the context's preemption_poll_s
    next_ask: float = field(default_factory=time.monotonic)
    ask_now: bool = False  # ask at this interval's end: agreed at the previous interval's all-reduce
    preempt_saved: bool = False
    last_report_s: float = 0.0

    def should_checkpoint(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0


@dataclass
class EpochStats:
    loss: float  # mean per-image loss over the steps this start trained
    steps: int
    seconds: float
    complete: bool = True  # False: a heal moved this rank into another epoch before this one ended


def train_epoch(
    cfg,
    ctx: TrainContext,
    trainer: Trainer,
    model: nn.Module,
    train: TrainBatches,
    cadence: Cadence,
    sync: StepSync,
    sample_log=None,
) -> EpochStats:
    """The rest of epoch `trainer.progress.epoch` from its step_in_epoch: steps, progress lines every
    run.log_every steps (the interval's one host sync), preemption and mid-epoch checkpoints. Each step is planned
    for the ranks the sync says take part in it; one that does not commit is trained again on the same images.
    A heal that moves this rank into another epoch ends this one early (the caller goes on from the new state)."""
    p, device = trainer.progress, ctx.device
    epoch, steps_per_epoch = p.epoch, trainer.plan.steps_per_epoch
    t_epoch = t_mark = time.perf_counter()
    data_wait, interval_steps, images = 0.0, 0, 0
    loss_sum, epoch_loss = torch.zeros((), device=device), torch.zeros((), device=device)
    share, batches, heals = None, None, sync.heals
    while p.step_in_epoch < steps_per_epoch:
        step_plan, rank = sync.begin_step()
        if p.epoch != epoch:  # healed into another epoch
            return EpochStats(float("nan"), 0, time.perf_counter() - t_epoch, complete=False)
        if batches is None or (step_plan.world_size, rank) != share or sync.heals != heals:
            share, heals = (step_plan.world_size, rank), sync.heals
            train.set_share(step_plan, rank)
            batches = iter(train.epoch(epoch, p.step_in_epoch))
        t0 = time.perf_counter()
        x, y = next(batches)
        data_wait += time.perf_counter() - t0
        if trainer.mixup is not None:
            torch.manual_seed(seed_for("mixup", cfg.system.seed, p.step, rank))
            x, y = trainer.mixup(x, y)
        loss = trainer.backward(model, x, y, step_plan, rank)
        if not sync.commit():
            trainer.discard()
            batches = None  # the same step again: its images are read anew
            continue
        trainer.apply()
        if sample_log is not None:
            sample_log.commit()
        p.step += 1
        p.step_in_epoch += 1
        loss_sum += loss
        epoch_loss += loss
        interval_steps += 1
        images += len(x)
        checkpoint_now = cadence.should_checkpoint(p.step)
        if p.step_in_epoch % cfg.run.log_every == 0 or p.step_in_epoch == steps_per_epoch:
            # The interval's one host sync: an all-reduce of the loss, of rank 0's word on asking about
            # preemption at the next interval, and of its decision on the notice asked for at this one.
            notice = ctx.preemption() if cadence.ask_now else None  # a barrier under Ray: every rank calls it
            if cadence.ask_now:
                cadence.next_ask = time.monotonic() + cadence.poll_s
            decide = ctx.world_rank == 0 and notice is not None and not cadence.preempt_saved
            decide = decide and preemption_checkpoint(ctx, notice, cadence.last_report_s, p.step)
            ask_next = ctx.world_rank == 0 and time.monotonic() >= cadence.next_ask
            flags = loss_sum.new_tensor([float(ask_next), float(decide)])
            total_loss, asked, decided = sync.all_reduce_sum(torch.cat((loss_sum.reshape(1), flags))).tolist()
            cadence.ask_now = asked > 0
            if decided > 0:
                cadence.preempt_saved, checkpoint_now = True, True
            _log_interval(cfg, ctx, trainer, total_loss, interval_steps, time.perf_counter() - t_mark, data_wait)
            loss_sum.zero_()
            interval_steps, data_wait, t_mark = 0, 0.0, time.perf_counter()
        if checkpoint_now and p.step_in_epoch < steps_per_epoch:  # the epoch's end reports anyway
            sync.settle(trainer.model)
            t_report = time.perf_counter()
            report(ctx, trainer, {"epoch": epoch, "step": p.step, "world_size": ctx.world_size})
            cadence.last_report_s = time.perf_counter() - t_report
    loss_total, images_total = sync.all_reduce_sum(torch.stack((epoch_loss, epoch_loss.new_tensor(float(images))))).tolist()
    steps = round(images_total / trainer.plan.global_batch)
    return EpochStats(loss_total / max(images_total, 1), steps, time.perf_counter() - t_epoch, p.epoch == epoch)


def _log_interval(cfg, ctx, trainer: Trainer, total_loss: float, steps: int, elapsed: float, data_wait: float):
    p, plan = trainer.progress, trainer.plan
    images = steps * plan.global_batch
    ips, compute_ips = images / max(elapsed, 1e-9), images / max(elapsed - data_wait, 1e-9)
    lr = trainer.optimizer.param_groups[0]["lr"]
    scale = f" scale {trainer.scaler.get_scale():.0f}" if trainer.scaler.is_enabled() else ""
    loss = total_loss / images
    eta = _fmt_time((plan.total_steps - p.step) * elapsed / steps)
    ctx.log(
        f"epoch {p.epoch + 1}/{plan.epochs} step {p.step_in_epoch}/{plan.steps_per_epoch} loss {loss:.4f} "
        f"lr {lr:.5f}{scale} img/s {ips:.1f} (compute {compute_ips:.1f}) eta {eta}"
    )
    metrics = {
        "train/loss_step": loss,
        "train/lr": lr,
        "train/img_per_s": ips,
        "train/compute_img_per_s": compute_ips,
        "train/data_time_s": data_wait / steps,
        "world_size": ctx.world_size,
    }
    if scale:
        metrics["train/grad_scale"] = trainer.scaler.get_scale()
    ctx.track(metrics, p.step)


def epoch_record(trainer: Trainer, ctx: TrainContext, stats: EpochStats, val: dict[str, float], size: int) -> dict[str, Any]:
    """The record of a finished epoch: what metrics.jsonl, MLflow and Ray's report get."""
    p = trainer.progress
    return {
        "epoch": p.epoch + 1,
        "step": p.step,
        "train/loss": stats.loss,
        "train/lr": trainer.optimizer.param_groups[0]["lr"],
        "train/img_per_s": stats.steps * trainer.plan.global_batch / max(stats.seconds, 1e-9),
        "train/resolution": size,
        "val/top1": val["top1"],
        "val/top5": val["top5"],
        "val/loss": val["loss"],
        "world_size": ctx.world_size,
        "epoch_time_s": stats.seconds,
    }


def fit(cfg, ctx: TrainContext, loaders: Loaders, plan: RunPlan) -> dict[str, Any]:
    """Train from the context's latest checkpoint (or from scratch) to the end of the schedule. `plan` is the
    run's plan at the context's world size, which `loaders` were made for."""
    device = ctx.device
    train = loaders.train
    trainer = Trainer(cfg, device, loaders.num_classes, plan, ctx.world_rank)
    if cfg.system.cudnn_benchmark and device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for note in loaders.notes:
        ctx.log(note)
    if orphans := ckpt.remove_orphaned_staging():  # every rank: each node has its own /tmp
        ctx.log(f"removed {len(orphans)} checkpoint staging folders left by killed workers")
    with ctx.open_checkpoint() as resume_from:
        if resume_from:
            resume(ctx, trainer, resume_from, plan)
    progress = trainer.progress
    progress.world_size = ctx.world_size
    make_sync = getattr(ctx, "make_sync", None)  # a context of replica groups brings its own (rn50_ray/replica.py)
    sync = make_sync(trainer, plan) if make_sync else FixedSync(plan, ctx.world_rank)
    model = trainer.wrap(sync=sync)
    model.train()
    ctx.log(
        f"plan: {plan.describe()}; precision {trainer.precision.name}; "
        f"{'channels_last' if trainer.channels_last else 'contiguous'}"
    )
    ctx.track_start(progress.step, _start_tags(ctx, loaders, trainer, plan))
    cadence = Cadence(cfg.run.checkpoint_every_steps, ctx.preemption_poll_s)
    first_step_unix: list[float] = []  # wall clock at the end of this start's first step: the startup figure
    summary: dict[str, Any] = {}
    epochs_this_run = 0
    while progress.epoch < plan.epochs:
        size, last = plan.sizes.at(progress.epoch), progress.epoch + 1 == plan.epochs
        clock = _FirstStepClock(train, device, first_step_unix, ctx.log)
        stats = train_epoch(cfg, ctx, trainer, model, clock, cadence, sync, loaders.sample_log)
        if not stats.complete:
            continue
        sync.settle(trainer.model)  # one set of BatchNorm statistics to evaluate and checkpoint
        loaders.val.set_share(ctx.world_rank, ctx.world_size)  # the ranks of the epoch's last step share the val split
        reduce = None if isinstance(sync, FixedSync) else sync.all_reduce_sum  # torchmetrics' own sync otherwise
        val = evaluate(
            model, loaders.val.batches(), loaders.num_classes, trainer.precision, device, cfg.eval.flip_tta, last, reduce
        )
        if last:  # which classes are bad, by name: into the run folder, and from there MLflow
            matrix = val.pop("confusion")
            if ctx.world_rank == 0:
                rows = per_class_rows(matrix, loaders.classes, loaders.class_names)
                ctx.write_text(PER_CLASS_FILE, rows_to_csv(rows))
                ctx.write_text(CONFUSION_FILE, matrix_to_csv(matrix))
                ctx.log(f"worst classes by val top-1: {worst(rows)}")
        record = epoch_record(trainer, ctx, stats, val, size)
        if trainer.ema is not None:
            ema = evaluate(
                trainer.ema.module,
                loaders.val.batches(),
                loaders.num_classes,
                trainer.precision,
                device,
                cfg.eval.flip_tta,
                reduce=reduce,
            )
            record.update({f"val_ema/{k}": v for k, v in ema.items()})
        if skipped := train.skipped + loaders.excluded:
            record["data/skipped_images"] = skipped
        if loaders.sample_log is not None:  # the audit: each rank's weights, to compare after a heal
            loaders.sample_log.weights(progress.step, trainer.model.state_dict())
        if math.isnan(stats.loss):
            raise FloatingPointError(f"train loss is NaN at epoch {progress.epoch + 1}; lower optim.lr_per_256")
        progress.epoch += 1
        progress.step_in_epoch = 0
        is_best = val["top1"] > progress.best_top1 or not progress.history
        progress.best_top1 = max(progress.best_top1, val["top1"])
        progress.history.append(record)
        ctx.log(
            f"epoch {progress.epoch}/{plan.epochs} done in {stats.seconds:.1f} s at {size} px: train loss "
            f"{stats.loss:.4f} | val top1 {val['top1']:.2f}% top5 {val['top5']:.2f}% loss {val['loss']:.4f} | "
            f"{record['train/img_per_s']:.1f} img/s"
        )
        ctx.track({k: v for k, v in record.items() if k not in ("step", "world_size")}, progress.step)
        if ctx.world_rank == 0:
            ctx.write_text("metrics.jsonl", jsonl(progress.history))
        t_report = time.perf_counter()
        report(ctx, trainer, record, best=is_best)
        cadence.last_report_s = time.perf_counter() - t_report
        epochs_this_run += 1
        summary = {**record, "first_step_unix": first_step_unix[0] if first_step_unix else None}
        if cfg.run.stop_after_epochs and epochs_this_run >= cfg.run.stop_after_epochs:
            if progress.epoch < plan.epochs:
                ctx.log(f"stopping after {epochs_this_run} epoch(s) as asked; rerun the same command to continue")
            break
    if not summary:  # nothing left to train: report the last state again
        summary = dict(progress.history[-1]) if progress.history else {}
    summary.update(best_top1=progress.best_top1, resizes=len(progress.resizes), finished=progress.epoch >= plan.epochs)
    summary["heals"] = sync.heals
    if hasattr(sync, "close"):
        sync.close()
    return summary


class _FirstStepClock:
    """The train batches, noting the wall clock once the first step of this start has finished (the startup
    figure): at the second batch asked for, after one sync, so the figure means a finished step on a GPU too."""

    def __init__(self, train: TrainBatches, device: torch.device, out: list[float], log):
        self.train, self.device, self.out, self.log = train, device, out, log
        self.steps_per_epoch = train.steps_per_epoch

    def set_share(self, plan: RunPlan, rank: int) -> None:
        self.train.set_share(plan, rank)

    def epoch(self, epoch: int, start_step: int = 0):
        for i, batch in enumerate(self.train.epoch(epoch, start_step)):
            if i == 1 and not self.out:
                sync_device(self.device)
                self.out.append(time.time())
                self.log("first step of this start done")  # what bench/scale.py times a start and a restart by
            yield batch


def _start_tags(ctx: TrainContext, loaders: Loaders, trainer: Trainer, plan: RunPlan) -> dict[str, Any]:
    device = ctx.device
    return {
        "device": f"{ctx.world_size} x {device.type}",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "data_backend": loaders.backend,
        "precision": trainer.precision.name,
        "memory_format": "channels_last" if trainer.channels_last else "contiguous",
        "accumulation": plan.batch.accum(0),
    }
