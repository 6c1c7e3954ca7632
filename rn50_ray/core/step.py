"""One training step and one evaluation step, with autocast, a GradScaler and accumulation.

Steps return tensors and never call `.item()`: the loop reads values only at logging
intervals, so the GPU is never stalled by a host sync inside an interval.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | tf32 | amp-fp16 | amp-bf16 (resolved, never auto)
    device_type: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"amp-fp16": torch.float16, "amp-bf16": torch.bfloat16}.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def scaler(self, init_scale: float) -> torch.amp.GradScaler:
        """A dynamic loss scaler under fp16; a pass-through otherwise."""
        return torch.amp.GradScaler(self.device_type, init_scale=init_scale, enabled=self.name == "amp-fp16")


def resolve_precision(name: str, device: torch.device) -> Precision:
    """`auto` is bf16 autocast where the GPU has bf16 (fp16 before Ampere), and fp32 on CPU, where bf16
    autocast without native support is many times slower (docs/PERFORMANCE.md, "Summary")."""
    if name == "auto":
        if device.type == "cuda":
            name = "amp-bf16" if torch.cuda.is_bf16_supported() else "amp-fp16"
        else:
            name = "fp32"
    if name not in ("fp32", "tf32", "amp-fp16", "amp-bf16"):
        raise ValueError(f"system.precision: expected auto, fp32, tf32, amp-fp16 or amp-bf16, got {name!r}")
    if device.type == "cuda":
        # tf32 is also right under AMP: the ops autocast leaves in fp32 may then use tensor cores.
        fast = name != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = fast
        torch.backends.cudnn.allow_tf32 = fast
    return Precision(name, device.type)


def backward_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    precision: Precision,
    accum: int = 1,
    loss_weight: float | None = None,
) -> torch.Tensor:
    """Forward and backward over `accum` micro-batches (sizes differing by at most one).

    Each image's loss counts with `loss_weight` in the gradient: the batch plan's W / N, so that DDP's mean
    over ranks is the mean over the global batch; by default 1 / len(images), this batch's mean. DDP
    all-reduces gradients only on the last micro-batch (`no_sync` on the others). Returns the sum of the
    images' losses as a 0-d tensor on the device.
    """
    weight = loss_weight if loss_weight is not None else 1.0 / len(images)
    total = torch.zeros((), device=images.device)
    chunks = list(zip(images.tensor_split(min(accum, len(images))), targets.tensor_split(min(accum, len(images))), strict=True))
    for i, (x, y) in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with precision.autocast():
                loss = criterion(model(x), y)  # the micro-batch's mean
            scaler.scale(loss * (len(x) * weight)).backward()
        total += loss.detach().float() * len(x)
    return total


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """The optimizer's step through the scaler (skipped on an fp16 overflow), then gradients cleared."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, optimizer: torch.optim.Optimizer,
               **kwargs) -> torch.Tensor:  # fmt: skip
    """`backward_step` (its keyword arguments), then one optimizer step. Returns the sum of the images' losses."""
    total = backward_step(model, images, targets, **kwargs)
    optimizer_step(optimizer, kwargs["scaler"])
    return total


@torch.no_grad()
def eval_step(model: nn.Module, images: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Logits in fp32."""
    with precision.autocast():
        return model(images).float()
