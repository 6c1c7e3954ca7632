"""Ray Train: the worker function, its TrainContext, and the driver that builds the TorchTrainer.

Resume is Ray Train V2's own: a trainer built again with the same RunConfig(storage_path,
name) finds its checkpoint snapshot, and `ray.train.get_checkpoint()` hands every worker the
latest checkpoint, after a driver restart, a worker failure or an elastic resize alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import posixpath
import re
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import yaml

from rn50_ray import tracking
from rn50_ray.config import Config, parse_resources
from rn50_ray.data.folder import check_dataset
from rn50_ray.data.screen import bad_image_error, find_bad_images
from rn50_ray.errors import ConfigError, DataError, UserError, find_user_error
from rn50_ray.tracking.sink import MetricSink

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


def run_filesystem(run_uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local folder or a URI (s3://, gs://, ...)."""
    if "://" in run_uri:
        return pafs.FileSystem.from_uri(run_uri)
    return pafs.LocalFileSystem(), os.path.abspath(run_uri)


def write_run_file(run_uri: str, name: str, text: str) -> None:
    fs, base = run_filesystem(run_uri)
    fs.create_dir(base, recursive=True)
    tmp = f"{base}/.{name}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, f"{base}/{name}")  # atomic on local disks; object stores replace whole objects anyway


def read_run_file(run_uri: str, name: str) -> str | None:
    fs, base = run_filesystem(run_uri)
    try:
        with fs.open_input_stream(f"{base}/{name}") as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


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
        # costs: each ask is a barrier through an actor, 2% of the step at one ask a second on 2 cores.
        self.preemption_poll_s = float(os.environ.get("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", 5.0))

    @contextlib.contextmanager
    def open_checkpoint(self) -> Iterator[str | None]:
        # as_directory() downloads once per node under a lock; ranks sharing a node must not each
        # write the same temporary folder (to_directory() does, and a rank then reads half a file).
        ckpt = ray.train.get_checkpoint()
        if ckpt is None and self.init_from:  # this run has none of its own yet: start from the other run's
            fs, path = run_filesystem(self.init_from)
            ckpt, self.from_init = ray.train.Checkpoint(path, filesystem=fs), True
        if ckpt is None:
            yield None
            return
        self.latest = posixpath.basename(ckpt.path.rstrip("/"))
        with ckpt.as_directory() as path:
            yield path

    def older_checkpoints(self) -> Iterator[contextlib.AbstractContextManager[str]]:
        fs, base = run_filesystem(self.run_uri)
        infos = fs.get_file_info(pafs.FileSelector(base))
        names = [i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
        for name in sorted((n for n in names if n < self.latest), reverse=True):  # names sort by epoch and step
            yield ray.train.Checkpoint(f"{base}/{name}", filesystem=fs).as_directory()

    def save_best(self, checkpoint_dir: str, name: str) -> None:
        fs, base = run_filesystem(self.run_uri)
        final = f"{base}/best_{name}"
        local = isinstance(fs, pafs.LocalFileSystem)
        target = f"{base}/.tmp_best_{name}" if local else final  # object stores have no folder rename
        fs.create_dir(target, recursive=True)
        pafs.copy_files(checkpoint_dir, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        if local:
            if fs.get_file_info(final).type != pafs.FileType.NotFound:
                fs.delete_dir(final)  # the same step trained again after a restart
            fs.move(target, final)
        for info in fs.get_file_info(pafs.FileSelector(base)):
            if info.base_name.startswith("best_") and info.path.rstrip("/") != final:
                fs.delete_dir(info.path)

    def preemption(self) -> dict[str, Any] | None:
        info = ray.train.get_preemption_info()  # a barrier: every rank calls it at the same steps
        if info is None:
            return None
        left = info.deadline_ms / 1000 - time.time() if info.deadline_ms else None
        return {"nodes": [n[:12] for n in info.preempted_node_ids], "seconds_left": left}

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{name}")
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
        write_run_file(self.run_uri, name, text)

    def log(self, line: str) -> None:
        if self.world_rank == 0:
            print(line, flush=True)


def _quiet_report_log() -> None:
    # Ray 2.60 logs every report at INFO with its whole metrics dict, per rank, under a logger named
    # by the module's file path, which LoggingConfig(log_level) does not reach.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(payload: dict[str, Any]) -> dict[str, Any]:
    # Imported here, not at the top: the driver never trains, and torchvision (with torch._dynamo) costs
    # it over a second of startup before Ray even starts the workers.
    from rn50_ray.core.loop import fit, input_format
    from rn50_ray.core.recipe import plan_batches
    from rn50_ray.data import Shard, make_loaders

    _quiet_report_log()
    cfg = Config.from_dict(payload["config"], source="worker config")
    ctx = RayContext(payload["run_uri"], payload.get("tracker"), cfg.run.init_from)
    plan = plan_batches(cfg.batch.global_size, ctx.world_size, cfg.batch.per_worker)
    shard = Shard(ctx.world_rank, ctx.world_size, ctx.device)
    loaders = make_loaders(
        cfg.data,
        shard,
        plan.per_rank,
        global_batch=plan.global_size,
        seed=cfg.system.seed,
        bad_files=payload.get("bad_files", ()),
        **input_format(cfg, ctx.device),
    )
    return fit(cfg, ctx, loaders, plan)


def resolve(cfg: Config) -> Config:
    """Fill what the defaults leave open: the global batch, the run name, an absolute storage path."""
    batch = cfg.batch
    if not batch.global_size:
        batch = dataclasses.replace(batch, global_size=batch.per_worker * cfg.max_workers)
    data = cfg.data
    if data.path and "://" not in data.path:
        data = dataclasses.replace(data, path=os.path.abspath(data.path))
    run = cfg.run
    storage = run.storage if "://" in run.storage else os.path.abspath(run.storage)
    name = run.name or f"rn50-{cfg.data.backend}-{cfg.fingerprint()}"
    return dataclasses.replace(cfg, data=data, batch=batch, run=dataclasses.replace(run, name=name, storage=storage))


def run_uri(cfg: Config) -> str:
    return f"{cfg.run.storage.rstrip('/')}/{cfg.run.name}"


def precheck_data(cfg: Config) -> list[str]:
    """Check the folder layout and screen the images on the driver, before any worker starts or
    output is written. Returns the undecodable files to leave out (under --skip-bad-images)."""
    if cfg.data.backend == "synthetic":
        return []
    train, val = check_dataset(cfg.data.path)
    bad: dict[str, str] = {}
    if cfg.data.screen_images:
        t0 = time.perf_counter()
        bad = find_bad_images(p for split in (train, val) for p, _ in split.samples)
        print(f"data: screened {len(train) + len(val)} images in {time.perf_counter() - t0:.1f} s, {len(bad)} undecodable")
        if bad and not cfg.data.skip_bad_images:
            raise bad_image_error(bad)
        train = train.without(bad)
    if len(train) < cfg.batch.global_size:
        raise DataError(
            f"{train.root}: {len(train)} images is less than one global batch ({cfg.batch.global_size}); lower batch.global_size"
        )
    if cfg.model.num_classes and cfg.model.num_classes < len(train.classes):
        raise ConfigError(
            f"model.num_classes: expected at least the {len(train.classes)} classes of "
            f"{cfg.data.path}, got {cfg.model.num_classes}"
        )
    return sorted(bad)


def check_existing_run(cfg: Config) -> bool:
    """True when the run folder holds a run of this config (it will resume). A different
    config under the same name is refused, never silently mixed in."""
    text = read_run_file(run_uri(cfg), "config.yaml")
    if text is None:
        return False
    old = Config.from_dict(yaml.safe_load(text), source=f"{run_uri(cfg)}/config.yaml")
    if old.fingerprint() != cfg.fingerprint():
        a, b = old.shaping_items(), cfg.shaping_items()
        diff = [k for k in b if a.get(k) != b[k]]
        raise ConfigError(
            f"run.name: run {cfg.run.name!r} in {cfg.run.storage} was started with another config "
            f"(differs in {', '.join(diff[:6])}); pass a new --name to start a new run"
        )
    return True


def connect(cfg: Config) -> None:
    # Worker prints reach the console once, through Ray's log forwarding, not twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    address = cfg.scale.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # a local Ray whose workers import this checkout
        ray.init(
            log_to_driver=True,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([PROJECT_ROOT, os.environ.get("PYTHONPATH", "")])}},
        )


def worker_resources(cfg: Config) -> dict[str, float]:
    gpus = cfg.scale.gpus_per_worker
    return {"CPU": cfg.scale.cpus_per_worker, **({"GPU": gpus} if gpus else {}), **parse_resources(cfg.scale.worker_resources)}


def check_resources(cfg: Config) -> None:
    """Fail fast instead of waiting forever for MIN workers that the cluster can never place."""
    have = ray.cluster_resources()
    n = cfg.min_workers
    need = {k: n * v for k, v in worker_resources(cfg).items()}
    short = {k: v for k, v in need.items() if v > have.get(k, 0)}
    if short:
        wants = ", ".join(f"{v:g} {k}" for k, v in need.items())
        has = ", ".join(f"{have.get(k, 0):g} {k}" for k in need)
        raise UserError(
            f"scale.workers: {n} workers need {wants}, but the Ray cluster has {has}; lower --workers "
            f"or --cpus-per-worker, add nodes, or pass --no-resource-check on an autoscaling cluster"
        )


def build_trainer(
    cfg: Config, bad_files: list[str] | None = None, tracker=None, callbacks: list | None = None
) -> ray.train.torch.TorchTrainer:
    gpus = cfg.scale.gpus_per_worker
    workers: int | tuple[int, int] = cfg.min_workers if cfg.min_workers == cfg.max_workers else (cfg.min_workers, cfg.max_workers)
    scaling = ray.train.ScalingConfig(
        num_workers=workers,
        use_gpu=gpus > 0,
        resources_per_worker=worker_resources(cfg),
        elastic_resize_monitor_interval_s=cfg.scale.resize_interval_s,
    )
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_uri": run_uri(cfg), "bad_files": bad_files or [], "tracker": tracker},
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scale.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or [],
        ),
    )


def checkpoint_step(path: str) -> int:
    """The optimizer step in a checkpoint folder's name (checkpoint_epoch0002_step00000012 -> 12)."""
    match = re.search(r"_step(\d+)$", path.rstrip("/"))
    return int(match[1]) if match else 0


def has_checkpoint(cfg: Config) -> bool:
    fs, base = run_filesystem(run_uri(cfg))
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    except (FileNotFoundError, OSError):
        return False
    return any(i.base_name.startswith("checkpoint_") and i.type == pafs.FileType.Directory for i in infos)


def best_checkpoint(run: str) -> str | None:
    """The run's `best_*` folder (kept apart from the newest-K checkpoints), if any."""
    fs, base = run_filesystem(run)
    try:
        names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(base)) if i.base_name.startswith("best_"))
    except (FileNotFoundError, OSError):
        return None
    return f"{run}/{names[-1]}" if names else None


def remove_run(cfg: Config) -> None:
    fs, base = run_filesystem(run_uri(cfg))
    try:
        fs.delete_dir(base)
    except (FileNotFoundError, OSError):
        pass


def start_sink(cfg: Config, tracked: tracking.TrackedRun, rewind_to: int | None = None):
    """The run's MetricSink as an actor pinned to this (the driver's) node, where an embedded SQLite
    store lives, and which outlives every worker group of the run."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0)(MetricSink).options(scheduling_strategy=here)
    return actor.remote(
        tracked.uri,
        tracked.run_id,
        read_file=partial(read_run_file, run_uri(cfg)),
        write_file=partial(write_run_file, run_uri(cfg)),
        system_metrics=cfg.tracking.system_metrics,
        rewind_to=rewind_to,
    )


def run_training(cfg: Config, *, callbacks: list | None = None, bad_files: list[str] | None = None) -> dict[str, Any]:
    """Driver: check, connect, open the MLflow run, train, log the results; rank 0's summary.
    A Tune trial passes its report callback, and the bad files its search found once."""
    cfg = resolve(cfg)
    bad_files = precheck_data(cfg) if bad_files is None else bad_files
    resuming = check_existing_run(cfg)
    connect(cfg)
    if cfg.scale.check_resources:
        check_resources(cfg)
    print(f"run {cfg.run.name!r} in {cfg.run.storage} ({'resuming' if resuming else 'new run'})", flush=True)
    print("resolved config:\n" + "\n".join("  " + ln for ln in cfg.to_yaml().splitlines()), flush=True)
    uri = run_uri(cfg)
    tracked = tracking.open_run(cfg, uri, partial(read_run_file, uri), partial(write_run_file, uri))
    created = not resuming
    write_run_file(uri, "config.yaml", cfg.to_yaml())
    rewind = checkpoint_step(cfg.run.init_from) if cfg.run.init_from and not has_checkpoint(cfg) else None
    sink = start_sink(cfg, tracked, rewind) if tracked else None
    status = "FAILED"
    try:
        result = build_trainer(cfg, bad_files, sink, callbacks).fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:
        message = find_user_error(e)
        if sink is not None:
            sink.set_tags.remote({"error": (message or f"{type(e).__name__}: {e}")[:4000]})
        if message and created and not has_checkpoint(cfg):
            remove_run(cfg)  # bad input found by a worker: leave no half-made run behind
            if tracked:
                tracking.delete_run(tracked)
                tracked = sink = None
        if message:
            raise UserError(message) from None
        raise
    finally:
        if sink is not None:
            ray.get(sink.close.remote(status))
    summary = dict(result.return_value or {})
    summary["run_uri"] = uri
    if summary.get("first_step_unix"):  # from this process's start: imports, Ray, workers, data, model
        summary["startup_s"] = summary["first_step_unix"] - psutil.Process().create_time()
    latest = result.checkpoint if hasattr(result, "checkpoint") else None
    summary["checkpoint"] = latest.path if latest else None
    summary["best_checkpoint"] = best_checkpoint(uri)
    if tracked:
        log_run_results(cfg, tracked, summary["best_checkpoint"] or summary["checkpoint"])
        summary["mlflow"] = f"run {tracked.run_id} at {tracked.uri}"
    return summary


def log_run_results(cfg: Config, tracked: tracking.TrackedRun, best: str | None) -> None:
    """The run folder's config and epoch records, their plots, and (given `best`) the checkpoint and model."""
    text = read_run_file(run_uri(cfg), "metrics.jsonl") or ""
    history = [json.loads(line) for line in text.splitlines()]
    tracking.log_results(tracked, cfg, {"config.yaml": cfg.to_yaml(), "metrics.jsonl": text}, history, best)
