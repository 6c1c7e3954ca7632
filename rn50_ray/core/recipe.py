"""NVIDIA's ResNet50 v1.5 recipe: parameter groups, optimizer, LR schedule, loss, mixup and the weight EMA.

Every function takes plain values or one config section, never the whole config tree.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from rn50_ray.errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float, decay_bn_and_bias: bool = False) -> list[dict]:
    """Weight decay on conv and linear weights only. BN parameters and every bias are found by
    module type and parameter name, so the downsample BNs and the FC bias are excluded too
    (NVIDIA's name match on "bn" misses them)."""
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            exempt = (is_norm or name == "bias") and not decay_bn_and_bias
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def sgd_kernel(impl: str, device: torch.device, loss_scaling: bool) -> str:
    """The SGD kernel `optim.impl` stands for.

    `auto` is fused, on CUDA and on CPU (on CPU, foreach is slower than the plain loop and fused faster:
    docs/PERFORMANCE.md, "SGD kernels"), except under a dynamic loss scaler: torch's fused SGD writes
    the overflowing gradient into the momentum buffer on a step the scaler skips, and the weights blow
    up on the next one (tests/test_fast_path.py shows it). There foreach on CUDA, the loop on CPU.
    """
    if impl == "auto":
        return "fused" if not loss_scaling else "foreach" if device.type == "cuda" else "for-loop"
    if impl == "fused" and loss_scaling:
        raise ConfigError(
            "optim.impl: fused SGD is unsafe with amp-fp16's loss scaler (it corrupts the momentum on "
            "skipped overflow steps); use auto, foreach or for-loop, or system.precision amp-bf16"
        )
    return impl


def build_optimizer(model: nn.Module, optim_cfg, lr: float, kernel: str) -> torch.optim.SGD:
    """NVIDIA's SGD with `kernel` (fused, foreach or for-loop) from `sgd_kernel`."""
    return torch.optim.SGD(
        param_groups(model, optim_cfg.weight_decay, optim_cfg.bn_bias_decay),
        lr=lr,
        momentum=optim_cfg.momentum,
        nesterov=optim_cfg.nesterov,
        fused=kernel == "fused",
        foreach=kernel == "foreach",  # False, not None, for the loop: None is foreach on CUDA
    )


def build_scheduler(optimizer: torch.optim.Optimizer, sched_cfg, steps_per_epoch: int) -> lr_scheduler.LRScheduler:
    """Stepped once per optimizer step. Per-iteration linear warmup, then cosine, linear or step decay; or
    FFCV's triangular schedule: linear from 1e-4 x peak to the peak at peak_epoch, then linear to end_lr."""
    total = sched_cfg.epochs * steps_per_epoch
    base = optimizer.param_groups[0]["lr"]
    end = min(sched_cfg.end_lr / base, 1.0) if base > 0 else 0.0
    if sched_cfg.kind == "triangular":
        peak = min(max(round(sched_cfg.peak_epoch * steps_per_epoch), 1), max(total - 1, 1))
        rise = lr_scheduler.LinearLR(optimizer, start_factor=1e-4, end_factor=1.0, total_iters=peak)
        fall = lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=end, total_iters=max(total - peak, 1))
        return lr_scheduler.SequentialLR(optimizer, schedulers=[rise, fall], milestones=[peak])
    warmup = min(round(sched_cfg.warmup_epochs * steps_per_epoch), max(total - 1, 0))
    after = max(total - warmup, 1)
    if sched_cfg.kind == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=after, eta_min=sched_cfg.end_lr)
    elif sched_cfg.kind == "linear":
        main = lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=end, total_iters=after)
    elif sched_cfg.kind == "step":
        milestones = [max(m * steps_per_epoch - warmup, 1) for m in sched_cfg.milestones]
        main = lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=sched_cfg.gamma)
    else:
        raise ValueError(f"schedule.kind: expected cosine, linear, step or triangular, got {sched_cfg.kind!r}")
    if warmup <= 1:
        return main
    # lr(s) = base * (s + 1) / warmup for s < warmup, as NVIDIA's (s counted in iterations, not epochs).
    warm = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return lr_scheduler.SequentialLR(optimizer, schedulers=[warm, main], milestones=[warmup])


def build_criterion(label_smoothing: float) -> nn.Module:
    # CrossEntropyLoss takes class indices or, under mixup, class probabilities.
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def build_mixup(alpha: float, num_classes: int):
    """torchvision's batch MixUp, or None when off."""
    if alpha <= 0:
        return None
    from torchvision.transforms import v2

    return v2.MixUp(alpha=alpha, num_classes=num_classes)


class WeightEMA(AveragedModel):
    """NVIDIA's weight EMA (DeepLearningExamples' `EMA`): after optimizer step t (from 0),
    ema = d_t * ema + (1 - d_t) * weights with d_t = min(decay, (1 + t) / (10 + t)), so the random initial
    weights it starts from wash out within the first steps. Inside torch's AveragedModel, so checkpoints and
    evaluation load it as one. update_parameters is written here because torch's reads n_averaged on the host
    twice a step, and each read is a GPU sync; here n_averaged stays a CPU tensor and t is read from it."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, use_buffers=True)
        self.decay = decay

    def decay_at(self, t: int) -> float:
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        ours = itertools.chain(self.module.parameters(), self.module.buffers())
        pairs = list(zip(ours, itertools.chain(model.parameters(), model.buffers()), strict=True))
        floats = [(a, m.detach()) for a, m in pairs if a.is_floating_point()]
        update = get_ema_multi_avg_fn(self.decay_at(int(self.n_averaged)))
        update([a for a, _ in floats], [m for _, m in floats], self.n_averaged)
        for a, m in pairs:
            if not a.is_floating_point():
                a.copy_(m)  # BatchNorm's num_batches_tracked: a count, not averaged
        self.n_averaged += 1  # a CPU tensor: no device work


def build_ema(model: nn.Module, decay: float) -> WeightEMA | None:
    return WeightEMA(model, decay) if decay > 0 else None
