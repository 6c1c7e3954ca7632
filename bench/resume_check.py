"""The real training loop on one device through the Ray-free LocalContext: train, crash, resume, compare.

One part per process, as a crash and a restart are (bench/gpu_check.py runs the three parts):
  full    trains the whole schedule and writes each step's loss;
  crash   trains with a checkpoint every --every steps and dies (os._exit, no cleanup) at step --crash-at;
  resume  the same command as crash, minus the crash: it resumes from the newest checkpoint and trains on.
The resumed run's per-step losses must equal the full run's. With --deterministic (cuDNN and cuBLAS's
deterministic kernels) they are bit-identical on a GPU, and on a CPU either way. Needs torch, torchvision
and PIL only. Writes <out>/<part>.json: {step: loss}, peak device memory in training and in validation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rn50_ray.config import load_config, resolve
from rn50_ray.core.context import LocalContext
from rn50_ray.core.evaluation import evaluate
from rn50_ray.core.loop import fit
from rn50_ray.core.trainer import input_format
from rn50_ray.data.loaders import open_loaders
from rn50_ray.data.types import Shard
from rn50_ray.evaluate import pick_device


class Crashing(LocalContext):
    """Dies like a killed process once step `crash_at` is logged: no cleanup, no last checkpoint."""

    def __init__(self, run_dir, device, crash_at: int):
        super().__init__(run_dir, device, quiet=True, keep=10)
        self.crash_at = crash_at

    def track(self, metrics: dict, step: int) -> None:
        super().track(metrics, step)
        if step >= self.crash_at and "train/loss_step" in metrics:
            os._exit(3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("full", "crash", "resume"))
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="a folder: the run's checkpoints and each part's JSON")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="amp-bf16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--micro", type=int, default=128, help="batch.per_worker: accumulation when below the global batch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--every", type=int, default=4, help="checkpoint every N steps")
    p.add_argument("--crash-at", type=int, default=10)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--workers", type=int, default=8, help="DataLoader processes")
    p.add_argument("--deterministic", action="store_true")
    opts = p.parse_args()
    if opts.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
    device = pick_device(opts.device)
    cfg = load_config(
        [],
        {
            "data.path": opts.data,
            "data.backend": "pytorch",
            "data.image_size": opts.size,
            "data.loader_workers": opts.workers,
            "batch.global_size": opts.global_batch,
            "batch.per_worker": opts.micro,
            "schedule.epochs": opts.epochs,
            "schedule.warmup_epochs": 1,
            "optim.ema_decay": opts.ema,
            "system.precision": opts.precision,
            "system.cudnn_benchmark": not opts.deterministic,
            "run.log_every": 1,
            "run.checkpoint_every_steps": opts.every,
        },
    )
    cfg = resolve(cfg)
    layout = input_format(cfg, device)
    plan, loaders = open_loaders(cfg, Shard(0, 1, device), **layout)
    run_dir = Path(opts.out) / ("full" if opts.part == "full" else "run")
    if opts.part == "crash":
        ctx = Crashing(run_dir, device, opts.crash_at)
    else:
        ctx = LocalContext(run_dir, device, quiet=True, keep=10)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    summary = fit(cfg, ctx, loaders, plan)
    result = {
        "losses": {step: m["train/loss_step"] for step, m in ctx.tracked if "train/loss_step" in m},
        "resumed_from": ctx.tracked[0][0],  # the step the start began at
        "val_top1": summary.get("val/top1"),
        "val_ema_top1": summary.get("val_ema/top1"),
    }
    if device.type == "cuda":
        result["train_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        from rn50_ray.core.checkpoint import load_checkpoint
        from rn50_ray.core.trainer import Trainer

        trainer = Trainer(cfg, device, loaders.num_classes, plan)
        trainer.model.load_state_dict(load_checkpoint(ctx.latest_checkpoint())["model"])
        del summary
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        evaluate(trainer.model, loaders.val.batches(), loaders.num_classes, trainer.precision, device)
        result["val_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["val_batch"] = plan.val_batch
    Path(opts.out, f"{opts.part}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
