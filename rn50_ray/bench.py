"""`bench train | infer | data`: throughput of the training step, of inference and of the input pipelines.

In one process, on the same cores or GPU, each backend in turn: a table (or JSON) of the median img/s,
step time, peak GPU memory, model FLOP utilisation against a given peak, and CPU-ms per image. Speeds
belong in docs/PERFORMANCE.md, not in tests. Imports neither Ray nor MLflow, and DALI only when chosen,
so it runs on a bare CUDA machine (bench/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from rn50_ray.config import resolve
from rn50_ray.core.loop import sync_device
from rn50_ray.core.step import eval_step
from rn50_ray.core.trainer import Trainer, input_format
from rn50_ray.data.checks import usable_dataset
from rn50_ray.data.loaders import open_loaders
from rn50_ray.data.types import Shard
from rn50_ray.errors import UserError
from rn50_ray.evaluate import pick_device


@dataclass(frozen=True)
class BenchOptions:
    """How to measure; the config says what (model, batch, precision, data)."""

    what: str = "train"  # train | infer | data
    backends: tuple[str, ...] = ("synthetic",)
    image_sizes: tuple[int, ...] = ()  # one table per size; empty is data.image_size
    device: str = "auto"
    steps: int = 20  # measured steps after the warm-up
    warmup: int = 5
    window: int = 5  # steps between device syncs; one timing per window
    peak_tflops: float | None = None
    max_batch: int | None = None  # infer: the batch search's cap
    json: bool = False


TRAIN_GFLOP_224 = 24.7  # forward + backward of ResNet50 per 224 px image (3 x 8.2 GFLOP)
MAX_BATCH_CUDA = 1024  # where `bench infer` stops doubling the batch on a GPU unless --max-batch says


def _cpu_seconds() -> float:
    """User + system CPU time of this process (DALI's threads included) and its live children
    (DataLoader processes), which getrusage would count only once they exit."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


def _batches(train, steps: int):
    epoch = 0
    while True:
        for item in train.epoch(epoch):
            yield item
            steps -= 1
            if steps <= 0:
                return
        epoch += 1


def timed(run: Callable[[], Any], device: torch.device, warmup: int, steps: int, window: int) -> list[float]:
    """Seconds per step, one figure per window of steps. The device is synchronized only at window
    ends, so the host queues work ahead as in training."""
    for _ in range(warmup):
        run()
    sync_device(device)
    times = []
    for _ in range(max(steps // window, 1)):
        t = time.perf_counter()
        for _ in range(window):
            run()
        sync_device(device)
        times.append((time.perf_counter() - t) / window)
    return times


def largest_fitting_batch(
    measure: Callable[[int], list[float]], start: int, cap: int, device: torch.device
) -> tuple[int, list[float], list[int]]:
    """Doubles the batch from `start` while it is at most `cap` and fits in memory. Returns the largest
    batch that fit, its step times, and every batch tried (the last one may have run out of memory)."""
    best, best_times, tried, batch = 0, [], [], start
    while batch <= max(cap, start):
        tried.append(batch)
        try:
            times = measure(batch)
        except torch.OutOfMemoryError:
            out_of_memory = True
        else:
            out_of_memory = False
            best, best_times = batch, times
        if out_of_memory:  # outside the handler, so the traceback's tensors are gone before the cache is freed
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if not best:
                raise UserError(f"--batch-size: a batch of {start} does not fit in {device} memory; pass a smaller one")
            break
        batch *= 2
    return best, best_times, tried


def _flop_share(img_per_s: float, gflop_per_img: float, peak_tflops: float | None) -> float:
    return 100 * img_per_s * gflop_per_img / (peak_tflops * 1000) if peak_tflops else float("nan")


def bench_backend(cfg, what: str, backend: str, device: torch.device, args: BenchOptions) -> dict[str, Any]:
    """One backend's row. `cfg` is resolved for one worker (its global batch is this process's batch)."""
    cfg = cfg.with_overrides({"data.backend": backend}, "bench --backends")
    layout = input_format(cfg, device)  # as training's: channels_last, fp16 DALI output under AMP on a GPU
    channels_last = layout["channels_last"]
    # the folder's manifest: its build, if any, was announced once by run_bench
    plan, loaders = open_loaders(cfg, Shard(0, 1, device), **layout, log=lambda line: None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.system.cudnn_benchmark
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(cfg, device, loaders.num_classes, plan) if what != "data" else None
    batches = _batches(loaders.train, (args.warmup + args.steps) * 2 + 10)
    row: dict[str, Any] = {}
    batch, peak_mem = plan.global_batch, {}
    cpu0 = _cpu_seconds()
    scale = (cfg.data.image_size / 224) ** 2
    if what == "train":
        model = trainer.wrap(1)
        model.train()
        times = timed(lambda: trainer.step(model, *next(batches)), device, args.warmup, args.steps, args.window)
        gflop = TRAIN_GFLOP_224 * scale
    elif what == "infer":
        model = trainer.wrap(1)
        model.eval()
        images, _ = next(batches)
        single = images[:1].clone()
        lat = timed(lambda: eval_step(model, single, trainer.precision), device, args.warmup, args.steps, 1)
        row.update({f"b1_p{q}_ms": 1000 * statistics.quantiles(lat, n=100)[q - 1] for q in (50, 90, 99)} if len(lat) > 1 else {})

        def measure(n: int) -> list[float]:
            tiled = images.repeat(-(-n // len(images)), 1, 1, 1)[:n]  # the loaded images, repeated
            if channels_last:
                tiled = tiled.contiguous(memory_format=torch.channels_last)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = timed(lambda: eval_step(model, tiled, trainer.precision), device, args.warmup, args.steps, args.window)
            if device.type == "cuda":
                peak_mem[n] = torch.cuda.max_memory_allocated(device)
            return times

        cap = args.max_batch or (MAX_BATCH_CUDA if device.type == "cuda" else len(images))
        batch, times, tried = largest_fitting_batch(measure, len(images), cap, device)
        row["max_batch_tried"] = tried
        gflop = TRAIN_GFLOP_224 / 3 * scale
    else:
        times = timed(lambda: next(batches), device, args.warmup, args.steps, 1)
        gflop = 0.0
    step = statistics.median(times)
    ips = batch / step
    images_done = (len(times) * (args.window if what != "data" else 1) + args.warmup) * batch
    row = {
        "what": what,
        "backend": backend,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "image_size": cfg.data.image_size,
        "batch": batch,
        "precision": trainer.precision.name if trainer else "-",
        "channels_last": channels_last,
        "compile": cfg.system.compile,
        "img_per_s": ips,
        "step_ms": 1000 * step,
        "peak_mem_gib": peak_mem.get(batch, torch.cuda.max_memory_allocated(device)) / 2**30
        if device.type == "cuda"
        else float("nan"),
        "mfu_pct": _flop_share(ips, gflop, args.peak_tflops) if gflop else float("nan"),
        "cpu_ms_per_img": 1000 * (_cpu_seconds() - cpu0) / max(images_done, 1),
        "steps": len(times),
        "cores": os.cpu_count(),
        **row,
    }
    return row


COLUMNS = {
    "train": ("backend", "precision", "channels_last", "compile", "batch", "img_per_s", "step_ms", "peak_mem_gib", "mfu_pct"),
    "infer": ("backend", "precision", "channels_last", "compile", "batch", "img_per_s", "b1_p50_ms", "b1_p99_ms", "mfu_pct"),
    "data": ("backend", "image_size", "batch", "img_per_s", "step_ms", "cpu_ms_per_img", "steps"),
}


def print_table(rows: list[dict[str, Any]], what: str) -> None:
    cols = COLUMNS[what]
    print(f"bench {what} on {rows[0]['device']}, {rows[0]['image_size']} px")
    print(" | ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print(
            " | ".join(f"{r.get(c, float('nan')):>13.1f}" if isinstance(r.get(c), float) else f"{r.get(c)!s:>13}" for c in cols)
        )
    label = _labeller(rows)
    for r in rows:
        if len(r.get("max_batch_tried", ())) > 1:
            tried = ", ".join(map(str, r["max_batch_tried"]))
            print(f"{label(r)}: batches tried {tried}; the largest that fit: {r['batch']}")
    if len(rows) > 1:
        base = rows[0]["img_per_s"]
        print(f"ratios to {label(rows[0])}: " + ", ".join(f"{label(r)} {r['img_per_s'] / base:.2f}x" for r in rows))


def _labeller(rows: list[dict[str, Any]]) -> Callable[[dict[str, Any]], str]:
    """Names a row by what sets it apart from the others: its backend, precision, layout or compile."""
    names = {
        "backend": str,
        "precision": str,
        "channels_last": lambda on: "channels_last" if on else "contiguous",
        "compile": lambda on: "compiled" if on else "eager",
    }
    varying = [c for c in names if len({str(r.get(c)) for r in rows}) > 1] or ["backend"]
    return lambda r: "/".join(names[c](r.get(c)) for c in varying)


def run_bench(cfg, opts: BenchOptions, rescan: bool = False) -> int:
    """`cfg` as the command line gives it: the benchmark runs one process, so its batch is one worker's."""
    device = pick_device(opts.device)
    cfg = resolve(cfg.with_overrides({"scale.workers": "1"}, "bench"))
    if rescan or any(b != "synthetic" for b in opts.backends):  # read (or build) the manifest once, before any timing
        usable_dataset(cfg, rescan=rescan, log=lambda line: print(line, file=sys.stderr, flush=True))  # stdout: the table
    for size in opts.image_sizes or (cfg.data.image_size,):
        sized = cfg.with_overrides(
            {"data.image_size": size, "data.val_image_size": 0, "resolution.start_size": 0}, "--image-sizes"
        )
        torch.manual_seed(cfg.system.seed)
        rows = [bench_backend(sized, opts.what, b, device, opts) for b in opts.backends]
        if opts.json:
            print(json.dumps(rows, indent=2))
        else:
            print_table(rows, opts.what)
    return 0
