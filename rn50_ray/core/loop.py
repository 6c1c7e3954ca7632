"""`fit`: epochs of train steps, evaluation, checkpoints and progress lines, through a TrainContext."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rn50_ray.core import recipe
from rn50_ray.core.context import TrainContext, jsonl
from rn50_ray.core.model import build_model, model_kwargs
from rn50_ray.core.state import (
    Progress,
    load_checkpoint,
    progress_from_dict,
    remove_orphaned_staging,
    rng_state,
    save_checkpoint,
    set_rng_state,
    staging_dir,
)
from rn50_ray.core.step import Precision, eval_step, resolve_precision, train_step
from rn50_ray.errors import UserError


def use_channels_last(memory_format: str, device: torch.device) -> bool:
    return memory_format == "channels_last" or (memory_format == "auto" and device.type == "cuda")


def input_format(cfg, device: torch.device) -> dict[str, bool]:
    """make_loaders' layout options for this config's step on `device`: channels_last as the model,
    and fp16 batches on a GPU under AMP (DALI casts on the GPU, halving what the step reads)."""
    amp = resolve_precision(cfg.system.precision, device).autocast_dtype is not None
    return {
        "channels_last": use_channels_last(cfg.model.memory_format, device),
        "fp16_input": device.type == "cuda" and amp,
    }


@torch.no_grad()
def evaluate(model: nn.Module, batches, num_classes: int, precision: Precision, device: torch.device) -> dict[str, float]:
    """Top-1, top-5 (in %) and loss over this rank's batches, summed over all ranks by torchmetrics."""
    # Imported here: torchmetrics costs about a second at import, in every worker's startup.
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy

    was_training = model.training
    model.eval()
    top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro").to(device)
    loss = MeanMetric().to(device)
    for images, labels in batches:
        logits = eval_step(model, images, precision)
        top1.update(logits, labels)
        top5.update(logits, labels)
        loss.update(F.cross_entropy(logits, labels), weight=labels.numel())
    model.train(was_training)
    return {"top1": 100 * top1.compute().item(), "top5": 100 * top5.compute().item(), "loss": loss.compute().item()}


class Trainer:
    """The model, optimizer, scheduler, scaler and EMA of one worker, and their checkpoint state."""

    def __init__(self, cfg, device: torch.device, num_classes: int, plan: recipe.BatchPlan, steps_per_epoch: int):
        self.cfg, self.device, self.plan, self.steps_per_epoch = cfg, device, plan, steps_per_epoch
        self.num_classes = num_classes
        self.precision = resolve_precision(cfg.system.precision, device)
        self.channels_last = use_channels_last(cfg.model.memory_format, device)
        torch.manual_seed(cfg.system.seed)  # the same initial weights on every rank
        self.model = build_model(**model_kwargs(cfg.model, num_classes, self.channels_last)).to(device)
        self.scaler = self.precision.scaler(cfg.system.loss_scale)
        kernel = recipe.sgd_kernel(cfg.optim.impl, device, loss_scaling=self.scaler.is_enabled())
        lr = recipe.peak_lr(cfg.optim.lr_per_256, plan.global_size)
        self.optimizer = recipe.build_optimizer(self.model, cfg.optim, lr, kernel)
        self.scheduler = recipe.build_scheduler(self.optimizer, cfg.schedule, steps_per_epoch)
        self.ema = recipe.build_ema(self.model, cfg.optim.ema_decay)
        self.criterion = recipe.build_criterion(cfg.optim.label_smoothing)
        self.mixup = recipe.build_mixup(cfg.optim.mixup_alpha, num_classes)
        self.progress = Progress()

    def state_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "progress": asdict(self.progress),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "num_classes": self.num_classes,
        }

    def load_state_dict(self, state: dict[str, Any], keep_hyperparameters: bool = False) -> None:
        """Load a checkpoint. With `keep_hyperparameters` (starting from another run's checkpoint, as PBT
        does), the weights, momentum buffers and progress come from it, but the optimizer's hyperparameters
        and the LR schedule stay this config's, replayed to the checkpoint's step."""
        self.model.load_state_dict(state["model"])
        ours = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        if keep_hyperparameters:
            for group, hyper in zip(self.optimizer.param_groups, ours, strict=True):
                group.update(hyper)
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": replaying on purpose
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(state["progress"]["step"]):
                    self.scheduler.step()
        else:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.progress = progress_from_dict(state["progress"])
        set_rng_state(state["rng"])

    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step of `model` (this trainer's model, possibly wrapped)."""
        return train_step(
            model,
            images,
            labels,
            optimizer=self.optimizer,
            scaler=self.scaler,
            criterion=self.criterion,
            precision=self.precision,
            accum=self.plan.accum,
        )

    def wrap(self, world_size: int) -> nn.Module:
        """DDP when distributed, then torch.compile when asked. Loading happens before this."""
        model: nn.Module = self.model
        if world_size > 1 and dist.is_initialized():
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.cfg.system.compile:
            model = torch.compile(model)
        return model


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> list[float]:
    t = torch.as_tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def fit(cfg, ctx: TrainContext, loaders, plan: recipe.BatchPlan) -> dict[str, Any]:
    """Train from the context's latest checkpoint (or from scratch) to the end of the schedule."""
    device = ctx.device
    train, steps_per_epoch = loaders.train, loaders.train.steps_per_epoch
    trainer = Trainer(cfg, device, loaders.num_classes, plan, steps_per_epoch)
    if cfg.system.cudnn_benchmark and device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for note in loaders.notes:
        ctx.log(note)
    if orphans := remove_orphaned_staging():  # every rank: each node has its own /tmp
        ctx.log(f"removed {len(orphans)} checkpoint staging folders left by killed workers")
    with ctx.open_checkpoint() as resume:
        if resume:
            _resume(ctx, trainer, train, resume, plan)
    progress = trainer.progress
    progress.world_size = ctx.world_size
    model = trainer.wrap(ctx.world_size)
    model.train()
    total_steps = cfg.schedule.epochs * steps_per_epoch
    ctx.log(
        f"plan: global batch {plan.global_size} = {ctx.world_size} workers x {plan.micro} x {plan.accum} "
        f"accumulation; {steps_per_epoch} steps per epoch; peak LR "
        f"{recipe.peak_lr(cfg.optim.lr_per_256, plan.global_size):.4g}; precision {trainer.precision.name}; "
        f"{'channels_last' if trainer.channels_last else 'contiguous'}"
    )
    ctx.track_start(
        progress.step,
        {
            "device": f"{ctx.world_size} x {device.type}",
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "data_backend": loaders.backend,
            "precision": trainer.precision.name,
            "memory_format": "channels_last" if trainer.channels_last else "contiguous",
            "accumulation": plan.accum,
        },
    )
    epochs_this_run = 0
    preempt_saved, checkpoint_now, last_report_s = False, False, 0.0
    next_preemption_ask = time.monotonic()  # rank 0's clock, shared through the interval's all-reduce
    val: dict[str, float] = {}
    summary: dict[str, Any] = {}
    first_step_unix = None  # wall clock at the end of this start's first step: the startup figure
    while progress.epoch < cfg.schedule.epochs:
        epoch = progress.epoch
        t_epoch = t_mark = time.perf_counter()
        data_wait = 0.0
        loss_sum = torch.zeros((), device=device)
        interval_steps = 0
        epoch_loss = torch.zeros((), device=device)
        start = progress.step_in_epoch
        batches = iter(train.epoch(epoch, start))
        while True:
            t0 = time.perf_counter()
            item = next(batches, None)
            data_wait += time.perf_counter() - t0
            if item is None:
                break
            images, labels = item
            if trainer.mixup is not None:
                torch.manual_seed(cfg.system.seed * 1_000_003 + progress.step * 101 + ctx.world_rank)
                images, labels = trainer.mixup(images, labels)
            loss = trainer.step(model, images, labels)
            trainer.scheduler.step()
            if trainer.ema is not None:
                trainer.ema.update_parameters(trainer.model)
            progress.step += 1
            progress.step_in_epoch += 1
            if first_step_unix is None:
                sync_device(device)  # once per start, so the figure means a finished step on a GPU too
                first_step_unix = time.time()
            loss_sum += loss
            epoch_loss += loss
            interval_steps += 1
            if progress.step_in_epoch % cfg.run.log_every == 0 or progress.step_in_epoch == steps_per_epoch:
                # The only host sync of an interval: one all-reduce and one read. It also carries rank 0's
                # word on whether to ask about preemption, so every rank asks at the same step.
                ask = ctx.world_rank == 0 and time.monotonic() >= next_preemption_ask
                total_loss, asked = _all_reduce_sum(torch.stack((loss_sum, loss_sum.new_full((), float(ask)))), device)
                now = time.perf_counter()
                elapsed = now - t_mark
                images_done = interval_steps * plan.global_size
                ips = images_done / max(elapsed, 1e-9)
                compute_ips = images_done / max(elapsed - data_wait, 1e-9)
                eta = (total_steps - progress.step) * elapsed / interval_steps
                lr = trainer.optimizer.param_groups[0]["lr"]
                scale = f" scale {trainer.scaler.get_scale():.0f}" if trainer.scaler.is_enabled() else ""
                mean_interval_loss = total_loss / (interval_steps * ctx.world_size)
                ctx.log(
                    f"epoch {epoch + 1}/{cfg.schedule.epochs} step {progress.step_in_epoch}/{steps_per_epoch} "
                    f"loss {mean_interval_loss:.4f} lr {lr:.5f}{scale} "
                    f"img/s {ips:.1f} (compute {compute_ips:.1f}) eta {_fmt_time(eta)}"
                )
                ctx.track(
                    {
                        "train/loss_step": mean_interval_loss,
                        "train/lr": lr,
                        "train/img_per_s": ips,
                        "train/compute_img_per_s": compute_ips,
                        "train/data_time_s": data_wait / interval_steps,
                        "world_size": ctx.world_size,
                        **({"train/grad_scale": trainer.scaler.get_scale()} if scale else {}),
                    },
                    progress.step,
                )
                loss_sum.zero_()
                interval_steps, data_wait, t_mark = 0, 0.0, time.perf_counter()
                notice = None
                if asked:  # a barrier under Ray
                    notice = ctx.preemption()
                    next_preemption_ask = time.monotonic() + ctx.preemption_poll_s
                if notice is not None and not preempt_saved:
                    preempt_saved = True
                    checkpoint_now = _preemption_checkpoint(ctx, notice, last_report_s, progress.step)
            every = cfg.run.checkpoint_every_steps
            checkpoint_now |= bool(every) and progress.step % every == 0
            if checkpoint_now and progress.step_in_epoch < steps_per_epoch:  # the epoch's end reports anyway
                t_report = time.perf_counter()
                _report(ctx, trainer, {"epoch": epoch, "step": progress.step, "world_size": ctx.world_size}, train)
                last_report_s = time.perf_counter() - t_report
            checkpoint_now = False
        epoch_time = time.perf_counter() - t_epoch
        steps_done = progress.step_in_epoch - start
        (mean_loss,) = _all_reduce_sum(epoch_loss.reshape(1), device)
        mean_loss /= max(steps_done, 1) * ctx.world_size
        val = evaluate(model, loaders.val.batches(), loaders.num_classes, trainer.precision, device)
        record = {
            "epoch": epoch + 1,
            "step": progress.step,
            "train/loss": mean_loss,
            "train/lr": trainer.optimizer.param_groups[0]["lr"],
            "train/img_per_s": steps_done * plan.global_size / max(epoch_time, 1e-9),
            "val/top1": val["top1"],
            "val/top5": val["top5"],
            "val/loss": val["loss"],
            "world_size": ctx.world_size,
            "epoch_time_s": epoch_time,
        }
        if trainer.ema is not None:
            ema_val = evaluate(trainer.ema.module, loaders.val.batches(), loaders.num_classes, trainer.precision, device)
            record.update({f"val_ema/{k}": v for k, v in ema_val.items()})
        skipped = getattr(train, "skipped", 0) + loaders.excluded
        if skipped:
            record["data/skipped_images"] = skipped
        if math.isnan(mean_loss):
            raise FloatingPointError(f"train loss is NaN at epoch {epoch + 1}; lower optim.lr_per_256")
        progress.epoch += 1
        progress.step_in_epoch = 0
        is_best = val["top1"] > progress.best_top1 or not progress.history
        progress.best_top1 = max(progress.best_top1, val["top1"])
        progress.history.append(record)
        ctx.log(
            f"epoch {epoch + 1}/{cfg.schedule.epochs} done in {epoch_time:.1f} s: train loss {mean_loss:.4f} | "
            f"val top1 {val['top1']:.2f}% top5 {val['top5']:.2f}% loss {val['loss']:.4f} | "
            f"{record['train/img_per_s']:.1f} img/s"
        )
        ctx.track({k: v for k, v in record.items() if k not in ("step", "world_size")}, progress.step)
        if ctx.world_rank == 0:
            ctx.write_text("metrics.jsonl", jsonl(progress.history))
        t_report = time.perf_counter()
        _report(ctx, trainer, record, train, best=is_best)
        last_report_s = time.perf_counter() - t_report
        epochs_this_run += 1
        summary = {
            **record,
            "best_top1": progress.best_top1,
            "resizes": len(progress.resizes),
            "finished": progress.epoch >= cfg.schedule.epochs,
            "first_step_unix": first_step_unix,
        }
        if cfg.run.stop_after_epochs and epochs_this_run >= cfg.run.stop_after_epochs:
            if progress.epoch < cfg.schedule.epochs:
                ctx.log(f"stopping after {epochs_this_run} epoch(s) as asked; rerun the same command to continue")
            break
    if not summary:  # nothing left to train: report the last state again
        summary = {
            **(progress.history[-1] if progress.history else {}),
            "best_top1": progress.best_top1,
            "resizes": len(progress.resizes),
            "finished": True,
        }
    return summary


def _preemption_checkpoint(ctx: TrainContext, notice: dict[str, Any], last_report_s: float, step: int) -> bool:
    """Whether to checkpoint now: yes, unless the deadline is nearer than a checkpoint takes."""
    left = notice.get("seconds_left")
    nodes = ", ".join(notice.get("nodes", [])) or "a node"
    if left is not None and left < last_report_s:
        ctx.log(f"preemption: {nodes} draining in {left:.0f} s, sooner than a checkpoint takes ({last_report_s:.0f} s)")
        return False
    when = f" in {left:.0f} s" if left is not None else ""
    ctx.log(f"preemption: {nodes} draining{when}; checkpointing at step {step}")
    return True


def _load_first_readable(ctx: TrainContext, resume: str) -> tuple[dict[str, Any], str, contextlib.ExitStack]:
    """The newest checkpoint that loads. Writes are atomic, but storage can still lose or cut a
    file; an unreadable newest checkpoint falls back to the one before, and says so."""
    stack = contextlib.ExitStack()
    for candidate in itertools.chain([contextlib.nullcontext(resume)], ctx.older_checkpoints()):
        path = stack.enter_context(candidate)
        try:
            return load_checkpoint(path, map_location=ctx.device), path, stack
        except UserError as e:
            ctx.log(f"checkpoint unreadable, trying the one before: {e}")
    stack.close()
    raise UserError(f"no readable checkpoint for this run (the newest is {resume}); pass a new --name to start over")


def _resume(ctx: TrainContext, trainer: Trainer, train, resume: str, plan: recipe.BatchPlan) -> None:
    state, resume, stack = _load_first_readable(ctx, resume)
    with stack:
        trainer.load_state_dict(state, keep_hyperparameters=ctx.from_init)
        if ctx.from_init:
            ctx.log(f"starting from another run's checkpoint {resume}, with this run's hyperparameters")
        _after_load(ctx, trainer, train, resume, plan)


def _after_load(ctx: TrainContext, trainer: Trainer, train, resume: str, plan: recipe.BatchPlan) -> None:
    p = trainer.progress
    ctx.log(f"resumed from {resume}: epoch {p.epoch}, step {p.step} ({p.step_in_epoch} into the epoch)")
    if p.world_size and p.world_size != ctx.world_size:
        p.resizes.append({"step": p.step, "old": p.world_size, "new": ctx.world_size})
        ctx.log(
            f"resize: world size {p.world_size} -> {ctx.world_size} at step {p.step}; the global batch "
            f"stays {plan.global_size} ({plan.micro} x {plan.accum} accumulation per rank)"
        )
    _restore_data_state(ctx, train, resume, p)


def _restore_data_state(ctx: TrainContext, train, resume: str, p) -> None:
    """Give a reader with a state (DALI) its position, if the checkpoint has one for this rank."""
    if not hasattr(train, "load_state"):
        return
    file = Path(resume) / f"data_rank{ctx.world_rank}.bin"
    if p.world_size == ctx.world_size and file.is_file():
        train.load_state(file.read_bytes())
    elif p.step_in_epoch:
        ctx.log(
            f"data: the checkpoint has no reader state for world size {ctx.world_size}; epoch {p.epoch + 1} "
            f"continues at step {p.step_in_epoch} with a new data order"
        )


def _report(ctx: TrainContext, trainer: Trainer, metrics: dict[str, Any], train=None, best: bool = False) -> None:
    """Every rank reports (a barrier under Ray). Rank 0 writes the training state; every rank
    writes its reader state, if any, and Ray merges the ranks' folders into one checkpoint.
    A new best val top-1 is also kept apart, as `best_<name>`, beyond the newest-K pruning."""
    name = f"epoch{trainer.progress.epoch:04d}_step{trainer.progress.step:08d}"
    data_state = train.state() if train is not None and hasattr(train, "state") else None
    if ctx.world_rank != 0 and data_state is None:
        ctx.report(metrics, None, name)
        return
    with staging_dir() as tmp:
        if data_state is not None:
            (Path(tmp) / f"data_rank{ctx.world_rank}.bin").write_bytes(data_state)
        if ctx.world_rank == 0:
            save_checkpoint(tmp, trainer.state_dict(), trainer.cfg.to_yaml())
            if best:
                ctx.save_best(tmp, name)
        ctx.report(metrics, tmp, name)
