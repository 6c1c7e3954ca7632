"""The driver of a training run: resolve the config, check data and cluster, open the MLflow run, build and
run Ray Train's TorchTrainer, log the results.

A driver restart resumes: a trainer built again with the same RunConfig(storage_path, name) finds its
checkpoint snapshot (see rn50_ray/worker.py for the workers' side).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.train
import ray.train.torch
import yaml

from rn50_ray import error_log, run_folder, tracking
from rn50_ray.config import Config, parse_resources
from rn50_ray.core.checkpoint import step_of
from rn50_ray.core.per_class import PER_CLASS_FILE, rows_from_csv, worst
from rn50_ray.data.checks import dataset_ref, plan_for, usable_dataset
from rn50_ray.data.types import Dataset
from rn50_ray.errors import ConfigError, UserError, find_user_error
from rn50_ray.run_folder import run_uri
from rn50_ray.storage import Retrying
from rn50_ray.tracking.credentials import for_server
from rn50_ray.tracking.sink import MetricSink
from rn50_ray.worker import train_loop_per_worker

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


def check_existing_run(cfg: Config) -> bool:
    """True when the run folder holds a run of this config (it will resume). A different
    config under the same name is refused, never silently mixed in."""
    text = run_folder.read_file(run_uri(cfg), "config.yaml")
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


def store(cfg: Config) -> Retrying:
    """The driver's storage operations, riding out transient faults as the workers' do (rn50_ray/storage.py)."""
    uri = run_uri(cfg)

    def last() -> str | None:
        names = run_folder.checkpoints(uri)
        return run_folder.join(uri, names[-1]) if names else None

    return Retrying(cfg.run.storage, cfg.run.storage_retry_s, lambda line: print(line, flush=True), last)


def check_storage(cfg: Config) -> None:
    """Write and remove a small file in the run folder, and clear what failed writes of an earlier start left."""
    uri = run_uri(cfg)
    store(cfg)("a write check", lambda: run_folder.probe(uri))
    if left := run_folder.remove_partial(uri):
        print(f"storage: removed what failed writes left in {uri}: {', '.join(sorted(left))}", flush=True)


def connect(cfg: Config) -> None:
    # Worker prints reach the console once, through Ray's log forwarding, not twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if cfg.scale.fault_tolerance == "replica":
        from rn50_ray.replica import quiet_torchft

        quiet_torchft()  # before Ray starts: a local Ray's processes (the Lighthouse's) inherit this environment
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


def worker_resources(scale) -> dict[str, float]:
    """The Ray resources of one worker, from the `scale` config section."""
    gpus = scale.gpus_per_worker
    return {"CPU": scale.cpus_per_worker, **({"GPU": gpus} if gpus else {}), **parse_resources(scale.worker_resources)}


def cluster_shortfall(workers: int, scale) -> str | None:
    """None when the Ray cluster can place `workers` workers, else what they need against what it has."""
    have = ray.cluster_resources()
    need = {k: workers * v for k, v in worker_resources(scale).items()}
    if all(v <= have.get(k, 0) for k, v in need.items()):
        return None
    wants = ", ".join(f"{v:g} {k}" for k, v in need.items())
    return f"{workers} workers need {wants}, but the Ray cluster has " + ", ".join(f"{have.get(k, 0):g} {k}" for k in need)


def check_resources(cfg: Config) -> None:
    """Fail fast instead of waiting forever for MIN workers that the cluster can never place."""
    short = cluster_shortfall(cfg.min_workers, cfg.scale)
    if short:
        raise UserError(
            f"scale.workers: {short}; lower --workers or --cpus-per-worker, add nodes, or pass --no-resource-check "
            f"on an autoscaling cluster"
        )


class EndOnUserError(ray.train.UserCallback):
    """Runs in Ray Train's controller. A worker that stopped on bad input (a DataError, a ConfigError) or on a
    storage fault retrying does not fix (a full disk, a read-only store) fails the same way at every retry: the
    run ends at once, with that one line, instead of spending scale.max_failures on it."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for error in worker_exceptions.values():
            if message := find_user_error(error):
                error_log.install()  # the controller's traceback of this: to the log file, not the terminal
                raise UserError(message)


def torch_config(cfg: Config) -> ray.train.torch.TorchConfig:
    """gloo or NCCL; under --fault-tolerance replica, Ray's TorchftConfig (each worker a replica group)."""
    gpus = cfg.scale.gpus_per_worker > 0
    if cfg.scale.fault_tolerance == "replica":
        from rn50_ray.replica import torchft_config

        return torchft_config(gpus)
    return ray.train.torch.TorchConfig(backend="nccl" if gpus else "gloo")


def build_trainer(
    cfg: Config, dataset: Dataset | None, tracker=None, callbacks: list | None = None
) -> ray.train.torch.TorchTrainer:
    gpus = cfg.scale.gpus_per_worker
    workers: int | tuple[int, int] = cfg.min_workers if cfg.min_workers == cfg.max_workers else (cfg.min_workers, cfg.max_workers)
    scaling = ray.train.ScalingConfig(
        num_workers=workers,
        use_gpu=gpus > 0,
        resources_per_worker=worker_resources(cfg.scale),
        elastic_resize_monitor_interval_s=cfg.scale.resize_interval_s,
    )
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_uri": run_uri(cfg), "dataset": dataset_ref(dataset), "tracker": tracker},
        torch_config=torch_config(cfg),
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scale.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=[EndOnUserError(), *(callbacks or [])],
        ),
    )


def start_sink(cfg: Config, tracked: tracking.TrackedRun, rewind_to: int | None = None):
    """The run's MetricSink as an actor pinned to this (the driver's) node, where an embedded SQLite
    store lives, and which outlives every worker group of the run."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0)(MetricSink).options(scheduling_strategy=here)
    uri = run_uri(cfg)
    return actor.remote(
        tracked.uri,
        tracked.run_id,
        read_file=partial(run_folder.read_file, uri),
        write_file=partial(run_folder.write_file, uri),
        system_metrics=cfg.tracking.system_metrics,
        rewind_to=rewind_to,
        credentials=for_server(tracked.uri),  # the driver's, as an argument: never in a runtime_env
    )


def run_training(cfg: Config, *, callbacks: list | None = None, rescan: bool = False) -> dict[str, Any]:
    """Driver of a resolved config (config.resolve): check, connect, open the MLflow run, train, log the results;
    rank 0's summary. A Tune trial passes its report callback."""
    dataset = usable_dataset(cfg, rescan=rescan)  # the folder's manifest: read, or built once per folder version
    check_storage(cfg)  # a full, read-only or stalled store: waited for, or one line now, before any worker starts
    resuming = check_existing_run(cfg)
    tracking.check_tracking(cfg)  # unreachable, or refusing these credentials: one line now, before Ray starts
    connect(cfg)
    if cfg.scale.check_resources:
        check_resources(cfg)
    print(f"run {cfg.run.name!r} in {cfg.run.storage} ({'resuming' if resuming else 'new run'})", flush=True)
    print("resolved config:\n" + "\n".join("  " + ln for ln in cfg.to_yaml().splitlines()), flush=True)
    uri = run_uri(cfg)
    tracked = tracking.open_run(cfg, uri, partial(run_folder.read_file, uri), partial(run_folder.write_file, uri))
    store(cfg)("config.yaml", lambda: run_folder.write_file(uri, "config.yaml", cfg.to_yaml()))
    has_own = bool(run_folder.checkpoints(uri))
    rewind = step_of(cfg.run.init_from) if cfg.run.init_from and not has_own else None
    sink = start_sink(cfg, tracked, rewind) if tracked else None
    status = "FAILED"
    try:
        result = build_trainer(cfg, dataset, sink, callbacks).fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:
        message = find_user_error(e)
        if sink is not None:
            sink.set_tags.remote({"error": (message or f"{type(e).__name__}: {e}")[:4000]})
        if message and not resuming and not run_folder.checkpoints(uri):
            run_folder.remove(uri)  # bad input found by a worker: leave no half-made run behind
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
    latest = getattr(result, "checkpoint", None)  # None under --fault-tolerance replica: no Ray report
    names = run_folder.checkpoints(uri) if latest is None else [run_folder.basename(latest.path)]
    summary["checkpoint"] = run_folder.join(uri, names[-1]) if names else None
    summary["best_checkpoint"] = run_folder.best_checkpoint(uri)
    per_class = run_folder.read_file(uri, PER_CLASS_FILE)
    if per_class:
        summary["worst_classes"] = worst(rows_from_csv(per_class))
    if tracked:
        tracking.log_run_folder(cfg, plan_for(cfg, dataset), tracked, uri, summary["best_checkpoint"] or summary["checkpoint"])
        summary["mlflow"] = f"run {tracked.run_id} at {tracked.uri}"
        if tracked.uri.startswith(("http://", "https://")):
            summary["mlflow_url"] = tracking.ui_url(tracked.uri, tracked.experiment_id, tracked.run_id)
    return summary
