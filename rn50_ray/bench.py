"""`bench train` / `bench data`: throughput of the training step and of the input pipelines.

In one process, on the same cores, each backend in turn: a table of median img/s (and, for
`data`, CPU-ms per image), or JSON. Speeds belong in docs/PERFORMANCE.md, not in tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import time
from typing import Any

import torch

from rn50_ray.core.loop import Trainer, use_channels_last
from rn50_ray.core.recipe import plan_batches
from rn50_ray.data import Shard, make_loaders
from rn50_ray.evaluate import pick_device


def _cpu_seconds() -> float:
    """User + system time of this process and its finished or live children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _batches(train, steps: int):
    epoch = 0
    while True:
        for item in train.epoch(epoch):
            yield item
            steps -= 1
            if steps <= 0:
                return
        epoch += 1


def bench_backend(cfg, what: str, backend: str, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, backend=backend))
    global_size = cfg.batch.global_size or cfg.batch.per_worker
    plan = plan_batches(global_size, 1, cfg.batch.per_worker)
    channels_last = use_channels_last(cfg.model.memory_format, device)
    loaders = make_loaders(
        cfg.data,
        Shard(0, 1, device),
        plan.per_rank,
        global_batch=plan.global_size,
        seed=cfg.system.seed,
        channels_last=channels_last,
    )
    trainer = None
    if what == "train":
        trainer = Trainer(cfg, device, loaders.num_classes, plan, loaders.train.steps_per_epoch)
        trainer.model.train()
    times: list[float] = []
    cpu0 = wall0 = 0.0
    t = time.perf_counter()
    for i, (images, labels) in enumerate(_batches(loaders.train, warmup + steps)):
        if trainer is not None:
            loss = trainer.step(trainer.model, images, labels)
            loss.item()  # the step has finished when its time is taken
        now = time.perf_counter()
        if i == warmup - 1 or (warmup == 0 and i == 0):
            cpu0, wall0 = _cpu_seconds(), now
        elif i >= warmup:
            times.append(now - t)
        t = now
    wall = time.perf_counter() - wall0
    images_done = len(times) * plan.global_size
    return {
        "what": what,
        "backend": backend,
        "device": str(device),
        "image_size": cfg.data.image_size,
        "batch": plan.global_size,
        "precision": trainer.precision.name if trainer else "-",
        "img_per_s": plan.global_size / statistics.median(times) if times else float("nan"),
        "step_ms": 1000 * statistics.median(times) if times else float("nan"),
        "cpu_ms_per_img": 1000 * (_cpu_seconds() - cpu0) / max(images_done, 1),
        "steps": len(times),
        "wall_s": wall,
        "cores": os.cpu_count(),
    }


def run_bench(args) -> int:
    from rn50_ray.cli import config_from_args

    cfg = config_from_args(args)
    device = pick_device(args.device)
    torch.manual_seed(cfg.system.seed)
    rows = [bench_backend(cfg, args.what, b.strip(), device, args.warmup, args.steps) for b in args.backends.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ("backend", "device", "image_size", "batch", "precision", "img_per_s", "step_ms", "cpu_ms_per_img", "steps")
    print(f"bench {args.what}")
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>14.1f}" if isinstance(r[c], float) else f"{r[c]!s:>14}" for c in cols))
    if len(rows) > 1:
        base = rows[0]["img_per_s"]
        print("ratios to " + rows[0]["backend"] + ": " + ", ".join(f"{r['backend']} {r['img_per_s'] / base:.2f}x" for r in rows))
    return 0
