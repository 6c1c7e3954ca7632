"""The Ray Train side of a run: each worker's function, and the TrainContext it gives the training loop.

Resume is Ray Train V2's own: `ray.train.get_checkpoint()` hands every worker the latest checkpoint, after a
driver restart, a worker failure or an elastic resize alike; the worker then plans the run for its world size
(core/run_plan.py) and reads the data folder's manifest that its driver checked (it never scans the folder).
"""

from __future__ import annotations

import logging
from typing import Any

from rn50_ray import error_log
from rn50_ray.config import Config
from rn50_ray.ray_context import RayContext


def _quiet_report_log() -> None:
    # Ray 2.60 logs every report at INFO with its whole metrics dict, per rank, under a logger named
    # by the module's file path, which LoggingConfig(log_level) does not reach.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(payload: dict[str, Any]) -> dict[str, Any]:
    # Imported here, not at the top: the driver never trains, and torchvision (with torch._dynamo) would
    # add to its startup before Ray even starts the workers (docs/PERFORMANCE.md, "framework overhead").
    from rn50_ray.core.loop import fit
    from rn50_ray.core.trainer import input_format
    from rn50_ray.data.checks import plan_for, worker_dataset
    from rn50_ray.data.loaders import make_loaders
    from rn50_ray.data.types import Shard

    _quiet_report_log()
    error_log.install()  # a UserError's traceback goes to a log file; its one line reaches the terminal
    cfg = Config.from_dict(payload["config"], source="worker config")
    args = (payload["run_uri"], payload.get("tracker"), cfg.run.init_from, cfg.run.storage_retry_s)
    if cfg.scale.fault_tolerance == "replica":
        from rn50_ray.replica import ReplicaContext

        ctx = ReplicaContext(*args, keep=cfg.run.keep_checkpoints)
    else:
        ctx = RayContext(*args)
    dataset = worker_dataset(payload["dataset"], cfg)  # the manifest the driver checked: no scan
    plan = plan_for(cfg, dataset, ctx.world_size)
    shard = Shard(ctx.world_rank, ctx.world_size, ctx.device)
    loaders = make_loaders(cfg, shard, plan, dataset, **input_format(cfg, ctx.device))
    return fit(cfg, ctx, loaders, plan)
