"""How the ranks of a run agree on each step: who takes part, whether the step counts, and their sums.

`fit` asks a StepSync at every step. `FixedSync` is a fixed group (torch.distributed, or one process): every
rank takes part in every step, every step commits, and DDP averages the gradients. rn50_ray/replica.py
provides one over torchft, where each worker is its own replica group: a step is planned for the workers that
take part in its quorum, and it commits only if they all finished it. Torch only, so the core runs without Ray
and torchft.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from rn50_ray.core.run_plan import RunPlan


class StepSync(Protocol):
    heals: int  # times this rank's state was replaced: by a peer's, or by the run's newest checkpoint (replica mode)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model as the step runs it: DDP (or torchft's) where gradients are averaged over ranks."""

    def begin_step(self) -> tuple[RunPlan, int]:
        """Called before each step's batch is read: the plan for the ranks taking part in it and this rank's
        place among them. May replace this rank's training state with a peer's (a heal)."""

    def commit(self) -> bool:
        """After the backward pass: True if every rank taking part finished it (the optimizer steps), False if
        the step is to be trained again on the same images."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the ranks taking part (a host sync where there are several)."""

    def settle(self, model: nn.Module) -> None:
        """Before evaluating or checkpointing: the buffers (BatchNorm's running statistics, which each rank updates
        from its own batches) made those of the step's rank 0 on every rank."""


class FixedSync:
    """A fixed group: the context's world size and rank at every step."""

    heals = 0

    def __init__(self, plan: RunPlan, rank: int):
        self.plan, self.rank = plan, rank

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if self.plan.world_size > 1 and dist.is_initialized():
            ids = [device.index] if device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def begin_step(self) -> tuple[RunPlan, int]:
        return self.plan, self.rank

    def commit(self) -> bool:
        return True

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64 if t.device.type == "cpu" else torch.float32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        return t

    def settle(self, model: nn.Module) -> None:
        pass  # DDP broadcasts rank 0's buffers at every forward pass
