"""The narrow interfaces between the training loop and whatever runs and feeds it.

`fit` only talks to a TrainContext and reads batches through Loaders. Ray Train provides a context
(`rn50_ray.ray_context.RayContext`), and `LocalContext` runs the loop without Ray: in one process, for tests,
benchmarks and a bare GPU machine, or as one rank of a torch.distributed group that the caller started. The data
layer's backends (rn50_ray/data/) provide the Loaders.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from rn50_ray.core.checkpoint import BEST_PREFIX, CHECKPOINT_PREFIX, STATE_FILE

Batch = tuple[torch.Tensor, torch.Tensor]  # normalized float images on the device (N, 3, H, W), int64 labels


class TrainBatches(Protocol):
    steps_per_epoch: int
    skipped: int  # undecodable images dropped on the fly (--skip-bad-images, pytorch backend)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This rank's batches of steps start_step.. of `epoch`, one per optimizer step."""

    def set_share(self, plan, rank: int) -> None:
        """From the next `epoch` call on, the share of rank `rank` of the run plan `plan` (a RunPlan at the
        world size of the ranks taking part): a no-op where it is the share already read."""


class ValBatches(Protocol):
    def batches(self) -> Iterator[Batch]:
        """This rank's share of the val split, once."""

    def set_share(self, rank: int, world_size: int) -> None:
        """From the next `batches` call on, rank `rank`'s share among `world_size` (the ranks evaluating together)."""


@dataclass
class Loaders:
    train: TrainBatches
    val: ValBatches
    num_classes: int
    train_size: int
    val_size: int
    notes: list[str] = field(default_factory=list)  # lines for the log
    excluded: int = 0  # unusable files left out before training (--skip-bad-images)
    backend: str = ""  # the resolved backend
    classes: tuple[str, ...] = ()  # class folder names, by label
    class_names: dict[str, str] = field(default_factory=dict)  # folder -> readable name (the data's classes.json)
    sample_log: Any = None  # data.sample_log's writer: told when a step commits (data/audit.py)


class TrainContext(Protocol):
    world_rank: int
    world_size: int
    device: torch.device
    from_init: bool  # open_checkpoint gave another run's checkpoint (run.init_from), not one of this run's
    preemption_poll_s: float  # how often `preemption` is worth asking; inf where nothing ever drains

    def open_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """A local folder holding the checkpoint to resume from (or None), valid inside the block."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> None:
        """Called by every rank the same number of times; rank 0 passes the checkpoint."""

    def older_checkpoints(self) -> Iterator[contextlib.AbstractContextManager[str]]:
        """Checkpoints before the one `open_checkpoint` gave, newest first, each as a local folder
        valid inside its block: the fallbacks when that one cannot be read."""

    def save_best(self, checkpoint_dir: str, name: str) -> None:
        """Keep a copy of this checkpoint as the run's best (rank 0 only), replacing the previous best."""

    def preemption(self) -> dict[str, Any] | None:
        """None, or {"nodes": [...], "seconds_left": float | None} while a node of this run drains.
        Every rank calls it at the same steps, at most once per `preemption_poll_s`."""

    def track_start(self, step: int, tags: dict[str, Any]) -> None:
        """A worker group (re)started at `step` (rank 0 records it; others ignore it)."""

    def track(self, metrics: dict[str, float], step: int) -> None:
        """Send metrics to the experiment tracker without waiting (rank 0 records; others ignore)."""

    def write_text(self, name: str, text: str) -> None:
        """Write a small file into the run folder (rank 0 only)."""

    def log(self, line: str) -> None:
        """Print a line on rank 0."""


def replace_dir(src: str | os.PathLike, parent: Path, name: str) -> Path:
    """Copy a folder to parent/name so that it appears whole or not at all."""
    final, tmp = parent / name, parent / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


class LocalContext:
    """Checkpoints under `run_dir/checkpoint_*`, the newest K kept; one process, or rank `rank` of `world_size`
    in a torch.distributed group the caller started (rank 0 writes, the others only read)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        keep: int = 3,
        quiet: bool = False,
        init_from: str | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.run_dir = Path(run_dir)
        self.init_from, self.from_init = init_from, False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.world_rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.preemption_poll_s = math.inf
        self.keep, self.quiet = keep, quiet
        self.reports: list[dict[str, Any]] = []
        self.tracked: list[tuple[int, dict[str, Any]]] = []  # (step, metrics or start tags), for tests

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.run_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file())

    def latest_checkpoint(self) -> str | None:
        found = self.checkpoints()
        return str(found[-1]) if found else None

    def open_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        latest = self.latest_checkpoint()
        self.from_init = latest is None and bool(self.init_from)
        return contextlib.nullcontext(self.init_from if self.from_init else latest)

    def older_checkpoints(self) -> Iterator[contextlib.AbstractContextManager[str]]:
        return (contextlib.nullcontext(str(p)) for p in reversed(self.checkpoints()[:-1]))

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            replace_dir(checkpoint_dir, self.run_dir, f"{CHECKPOINT_PREFIX}{name}")
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def save_best(self, checkpoint_dir: str, name: str) -> None:
        kept = replace_dir(checkpoint_dir, self.run_dir, f"{BEST_PREFIX}{name}")
        for old in self.run_dir.glob(f"{BEST_PREFIX}*"):
            if old != kept:
                shutil.rmtree(old, ignore_errors=True)

    def preemption(self) -> dict[str, Any] | None:
        return None  # one process on one machine: nothing tells it of a drain

    def track_start(self, step: int, tags: dict[str, Any]) -> None:
        self.tracked.append((step, {"start": tags}))

    def track(self, metrics: dict[str, float], step: int) -> None:
        self.tracked.append((step, dict(metrics)))

    def write_text(self, name: str, text: str) -> None:
        tmp = self.run_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.run_dir / name)

    def log(self, line: str) -> None:
        if not self.quiet and self.world_rank == 0:
            print(line, flush=True)


def jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
