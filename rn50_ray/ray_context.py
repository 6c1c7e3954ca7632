"""RayContext: the TrainContext (core/context.py) a Ray Train worker gives the training loop: rank, device,
checkpoints through Ray's report, resume from `ray.train.get_checkpoint()`, storage faults ridden out.
rn50_ray/replica.py derives the replica-group context from it."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import ray
import ray.train
import ray.train.torch

from rn50_ray import error_log, run_folder
from rn50_ray.core.checkpoint import BEST_PREFIX, CHECKPOINT_PREFIX
from rn50_ray.storage import Retrying


class RayContext:
    """TrainContext over ray.train: rank, device, checkpoints and reports."""

    def __init__(self, run_uri: str, tracker=None, init_from: str = "", storage_retry_s: float = 600.0):
        tctx = ray.train.get_context()
        self.world_rank, self.world_size = tctx.get_world_rank(), tctx.get_world_size()
        self.device = ray.train.torch.get_device()  # the index into CUDA_VISIBLE_DEVICES, not a physical id
        self.run_uri = run_uri
        self.latest = ""
        self.tracker = tracker if self.world_rank == 0 else None  # a MetricSink actor, or None
        self.init_from, self.from_init = init_from, False
        # Ray Train's watcher learns of drains at this interval (its default: 5 s); asking more often only
        # costs: each ask is a barrier through an actor (docs/PERFORMANCE.md, "Preemption asks").
        self.preemption_poll_s = float(os.environ.get("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", 5.0))
        self.stored = ""  # the newest checkpoint this start stored (or resumed from): what a rerun resumes from
        self.storage = Retrying(
            run_folder.storage_of(run_uri), storage_retry_s, self.log, lambda: self.stored or None, details=error_log.path()
        )

    @contextlib.contextmanager
    def open_checkpoint(self) -> Iterator[str | None]:
        # as_directory() downloads once per node under a lock; ranks sharing a node must not each
        # write the same temporary folder (to_directory() does, and a rank then reads half a file).
        ckpt = ray.train.get_checkpoint()
        if ckpt is None and self.init_from:  # this run has none of its own yet: start from the other run's
            fs, path = run_folder.filesystem(self.init_from)
            ckpt, self.from_init = ray.train.Checkpoint(path, filesystem=fs), True
        if ckpt is None:
            yield None
            return
        self.latest = run_folder.basename(ckpt.path)
        if not self.from_init:
            self.stored = run_folder.join(self.run_uri, self.latest)
        with ckpt.as_directory() as path:
            yield path

    def older_checkpoints(self) -> Iterator[contextlib.AbstractContextManager[str]]:
        fs, base = run_folder.filesystem(self.run_uri)
        for name in reversed([n for n in run_folder.checkpoints(self.run_uri) if n < self.latest]):
            yield ray.train.Checkpoint(f"{base}/{name}", filesystem=fs).as_directory()

    def save_best(self, checkpoint_dir: str, name: str) -> None:
        fs, base = run_folder.filesystem(self.run_uri)
        final = f"{base}/{BEST_PREFIX}{name}"
        self.storage(f"best checkpoint {name}", lambda: run_folder.put_folder(checkpoint_dir, fs, final))
        for old in self.storage("listing best checkpoints", lambda: run_folder.folders(self.run_uri, BEST_PREFIX, strict=True)):
            if f"{base}/{old}" != final:
                self.storage(f"removing {old}", lambda old=old: fs.delete_dir(f"{base}/{old}"))

    def preemption(self) -> dict[str, Any] | None:
        info = ray.train.get_preemption_info()  # a barrier: every rank calls it at the same steps
        if info is None:
            return None
        left = info.deadline_ms / 1000 - time.time() if info.deadline_ms else None
        return {"nodes": [n[:12] for n in info.preempted_node_ids], "seconds_left": left}

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> None:
        if self.tracker is not None:  # in MLflow before Tune sees the report and may stop the trial
            ray.get(self.tracker.settle.remote())
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        upload = self._upload if ckpt is not None else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{name}", checkpoint_upload_fn=upload)
        if ckpt is not None and self.world_rank == 0:
            # The controller registers a reported checkpoint when it next polls; a group that dies before
            # then resumes from the one before. Waiting here (the other ranks wait at the next all-reduce)
            # bounds the loss to checkpoint_every_steps.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def _upload(self, checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        """Ray's upload, riding out storage faults: a stalled or throttling store is waited for (run.storage_retry_s),
        a full or read-only one ends the run in one line; the folder appears whole or not at all."""
        storage = ray.train.get_context().get_storage()
        fs, dest = storage.storage_filesystem, storage.build_checkpoint_path_from_name(dir_name)
        self.storage(f"checkpoint {dir_name}", lambda: run_folder.put_folder(checkpoint.path, fs, dest))
        self.stored = run_folder.join(self.run_uri, dir_name)
        return ray.train.Checkpoint(dest, filesystem=fs)

    def track_start(self, step: int, tags: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.started.remote(self.world_size, step, tags)  # fire and forget

    def track(self, metrics: dict[str, float], step: int) -> None:
        if self.tracker is not None:
            self.tracker.log.remote(metrics, step)

    def write_text(self, name: str, text: str) -> None:
        self.storage(name, lambda: run_folder.write_file(self.run_uri, name, text))

    def log(self, line: str) -> None:
        if self.world_rank == 0:
            print(line, flush=True)
