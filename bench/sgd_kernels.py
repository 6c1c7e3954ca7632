"""The training step with each SGD kernel (`optim.impl`), measured in turns within one process.

Each kernel gets its own model and optimizer; windows of a few steps of each run in turn, so a drift in
the machine's speed hits all of them alike. Prints each kernel's median img/s and its median ratio to
`for-loop` (torch's own default on CPU) over the rounds. Needs only torch and torchvision (the core layer).

    python bench/sgd_kernels.py [--image-size 32] [--batch 32] [--rounds 12] [--window 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rn50_ray.bench import timed
from rn50_ray.config import load_config
from rn50_ray.core.run_plan import plan_run
from rn50_ray.core.trainer import Trainer

KERNELS = ("for-loop", "foreach", "fused")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--window", type=int, default=5, help="steps of one kernel per turn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto")
    opts = p.parse_args()
    device = torch.device(opts.device)
    images = torch.randn(opts.batch, 3, opts.image_size, opts.image_size, device=device)
    labels = torch.randint(0, 1000, (opts.batch,), device=device)
    steps = {}
    for kernel in KERNELS:
        overrides = {"optim.impl": kernel, "system.precision": opts.precision, "batch.per_worker": opts.batch}
        cfg = load_config([], {**overrides, "batch.global_size": opts.batch, "schedule.warmup_epochs": 0})
        trainer = Trainer(cfg, device, 1000, plan_run(cfg, 1000 * opts.batch))  # 1,000 steps an epoch
        x = images.contiguous(memory_format=torch.channels_last) if trainer.channels_last else images
        steps[kernel] = lambda t=trainer, x=x: t.step(t.model, x, labels)
        for _ in range(3):  # warm-up
            steps[kernel]()
    ips: dict[str, list[float]] = {k: [] for k in KERNELS}
    for _ in range(opts.rounds):
        for kernel, step in steps.items():
            (seconds_per_step,) = timed(step, device, 0, opts.window, opts.window)  # one window per turn
            ips[kernel].append(opts.batch / seconds_per_step)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"SGD kernels: {name}, {opts.image_size} px, batch {opts.batch}, {opts.rounds} rounds of {opts.window} steps")
    for kernel in KERNELS:
        ratio = statistics.median(a / b for a, b in zip(ips[kernel], ips["for-loop"], strict=True))
        print(f"  {kernel:9s} {statistics.median(ips[kernel]):9.1f} img/s   ratio to for-loop {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
