"""The Ray Train side of a run: each worker's function, and the TrainContext it gives the training loop.

Resume is Ray Train V2's own: `ray.train.get_checkpoint()` hands every worker the latest checkpoint, after a
driver restart, a worker failure or an elastic resize alike; the worker then rebuilds everything that
depends on the world size (batch plan, shards) from the config.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch

from rn50_ray import run_folder
from rn50_ray.config import Config
from rn50_ray.core.checkpoint import BEST_PREFIX, CHECKPOINT_PREFIX


class RayContext:
    """TrainContext over ray.train: rank, device, checkpoints and reports."""

    def __init__(self, run_uri: str, tracker=None, init_from: str = ""):
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
        with ckpt.as_directory() as path:
            yield path

    def older_checkpoints(self) -> Iterator[contextlib.AbstractContextManager[str]]:
        fs, base = run_folder.filesystem(self.run_uri)
        for name in reversed([n for n in run_folder.checkpoints(self.run_uri) if n < self.latest]):
            yield ray.train.Checkpoint(f"{base}/{name}", filesystem=fs).as_directory()

    def save_best(self, checkpoint_dir: str, name: str) -> None:
        fs, base = run_folder.filesystem(self.run_uri)
        final = f"{base}/{BEST_PREFIX}{name}"
        local = isinstance(fs, pafs.LocalFileSystem)
        target = f"{base}/.tmp_{BEST_PREFIX}{name}" if local else final  # object stores have no folder rename
        fs.create_dir(target, recursive=True)
        pafs.copy_files(checkpoint_dir, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        if local:
            if fs.get_file_info(final).type != pafs.FileType.NotFound:
                fs.delete_dir(final)  # the same step trained again after a restart
            fs.move(target, final)
        for old in run_folder.folders(self.run_uri, BEST_PREFIX):
            if f"{base}/{old}" != final:
                fs.delete_dir(f"{base}/{old}")

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
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{name}")
        if ckpt is not None and self.world_rank == 0:
            # The controller registers a reported checkpoint when it next polls; a group that dies before
            # then resumes from the one before. Waiting here (the other ranks wait at the next all-reduce)
            # bounds the loss to checkpoint_every_steps.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def track_start(self, step: int, tags: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.started.remote(self.world_size, step, tags)  # fire and forget

    def track(self, metrics: dict[str, float], step: int) -> None:
        if self.tracker is not None:
            self.tracker.log.remote(metrics, step)

    def write_text(self, name: str, text: str) -> None:
        run_folder.write_file(self.run_uri, name, text)

    def log(self, line: str) -> None:
        if self.world_rank == 0:
            print(line, flush=True)


def _quiet_report_log() -> None:
    # Ray 2.60 logs every report at INFO with its whole metrics dict, per rank, under a logger named
    # by the module's file path, which LoggingConfig(log_level) does not reach.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(payload: dict[str, Any]) -> dict[str, Any]:
    # Imported here, not at the top: the driver never trains, and torchvision (with torch._dynamo) would
    # add to its startup before Ray even starts the workers (docs/PERFORMANCE.md, "framework overhead").
    from rn50_ray.core.batching import plan_batches
    from rn50_ray.core.loop import fit
    from rn50_ray.core.trainer import input_format
    from rn50_ray.data.loaders import make_loaders
    from rn50_ray.data.types import Shard

    _quiet_report_log()
    cfg = Config.from_dict(payload["config"], source="worker config")
    ctx = RayContext(payload["run_uri"], payload.get("tracker"), cfg.run.init_from)
    plan = plan_batches(cfg.batch.global_size, ctx.world_size, cfg.batch.per_worker)
    loaders = make_loaders(
        cfg.data,
        Shard(ctx.world_rank, ctx.world_size, ctx.device),
        plan,
        seed=cfg.system.seed,
        bad_files=payload.get("bad_files", ()),
        resolution=cfg.resolution,
        **input_format(cfg, ctx.device),
    )
    return fit(cfg, ctx, loaders, plan)
