"""One worker's training state: the model, optimizer, scheduler, scaler and EMA, and their checkpoint contents."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from rn50_ray.core import recipe
from rn50_ray.core.checkpoint import Progress, rng_state, set_rng_state
from rn50_ray.core.model import build_model, model_kwargs
from rn50_ray.core.run_plan import RunPlan
from rn50_ray.core.seeds import seed_for
from rn50_ray.core.step import backward_step, optimizer_step, resolve_precision
from rn50_ray.core.sync import FixedSync, StepSync


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


class Trainer:
    """The model, optimizer, scheduler, scaler and EMA of one rank, and their checkpoint state."""

    def __init__(self, cfg, device: torch.device, num_classes: int, plan: RunPlan, rank: int = 0):
        """`plan` is the run's plan at this rank's world size."""
        self.cfg, self.device, self.plan, self.rank = cfg, device, plan, rank
        self.num_classes = num_classes
        self.precision = resolve_precision(cfg.system.precision, device)
        self.channels_last = use_channels_last(cfg.model.memory_format, device)
        torch.manual_seed(seed_for("weights", cfg.system.seed))  # the same initial weights on every rank
        self.model = build_model(**model_kwargs(cfg.model, num_classes, self.channels_last)).to(device)
        self.scaler = self.precision.scaler(cfg.system.loss_scale)
        kernel = recipe.sgd_kernel(cfg.optim.impl, device, loss_scaling=self.scaler.is_enabled())
        self.optimizer = recipe.build_optimizer(self.model, cfg.optim, plan.peak_lr, kernel)
        self.scheduler = recipe.build_scheduler(self.optimizer, cfg.schedule, plan.steps_per_epoch)
        self.ema = recipe.build_ema(self.model, cfg.optim.ema_decay)
        self.criterion = recipe.build_criterion(cfg.optim.label_smoothing)
        self.mixup = recipe.build_mixup(cfg.optim.mixup_alpha, num_classes)
        self.progress = Progress()

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "progress": self.progress.to_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "num_classes": self.num_classes,
        }

    def load_state_dict(self, state: dict[str, Any], keep_hyperparameters: bool = False) -> None:
        """Load a checkpoint (loaded on the CPU: each part copies itself onto this trainer's device). With
        `keep_hyperparameters` (starting from another run's checkpoint, as PBT does), the weights, momentum
        buffers and progress come from it, but the optimizer's hyperparameters and the LR schedule stay this
        config's, replayed to the checkpoint's step."""
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
        # in place: the loop holds this object, and a heal (replica mode) loads a state mid-epoch
        vars(self.progress).update(vars(Progress(**state["progress"])))
        set_rng_state(state["rng"])

    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step of `model` (this trainer's model, possibly wrapped) on this rank's share of the
        global batch, as this trainer's plan splits it. Returns the sum of its images' losses, on the device."""
        loss_sum = self.backward(model, images, labels, self.plan, self.rank)
        self.apply()
        return loss_sum

    def backward(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, plan: RunPlan, rank: int) -> torch.Tensor:
        """Forward and backward of rank `rank`'s share of a step planned by `plan` (the ranks taking part in it)."""
        return backward_step(
            model,
            images,
            labels,
            scaler=self.scaler,
            criterion=self.criterion,
            precision=self.precision,
            accum=plan.batch.accum(rank),
            loss_weight=plan.batch.loss_weight,
        )

    def apply(self) -> None:
        """The step counts: the optimizer steps, then the LR schedule and the EMA."""
        optimizer_step(self.optimizer, self.scaler)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def discard(self) -> None:
        """The step does not count (a rank dropped out of it): its gradients go, it is trained again."""
        self.optimizer.zero_grad(set_to_none=True)

    def wrap(self, world_size: int = 1, sync: StepSync | None = None) -> nn.Module:
        """DDP (the sync's kind) where gradients are averaged over ranks, then torch.compile when asked.
        Loading happens before this."""
        sync = sync or FixedSync(self.plan.for_world(world_size), self.rank)
        model = sync.wrap(self.model, self.device)
        if self.cfg.system.compile:
            model = torch.compile(model)
        return model
