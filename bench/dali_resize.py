"""What a new epoch, and a progressive-resizing step with it, costs the DALI pipeline: each epoch builds its
pipeline (the native reader's file list is the epoch's order), at the epoch's size. Times every batch of two
epochs, the second at a larger size, and prints the steady batch time at each size against the batches right
after the change (the first of them includes the pipeline's build).

    python bench/dali_resize.py --data DIR [--sizes 160 192] [--batch 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rn50_ray.config import load_config, resolve
from rn50_ray.data.loaders import open_loaders
from rn50_ray.data.types import Shard


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--sizes", type=int, nargs=2, default=(160, 192))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    opts = p.parse_args()
    small, large = opts.sizes
    cfg = load_config([], {
        "data.path": opts.data, "data.backend": "dali-cpu", "data.image_size": large, "data.loader_workers": opts.threads,
        "resolution.start_size": small, "resolution.start_epoch": 0, "resolution.end_epoch": 1, "resolution.multiple": 8,
        "batch.per_worker": opts.batch, "batch.global_size": opts.batch,
    })  # fmt: skip
    _, loaders = open_loaders(resolve(cfg), Shard(0, 1, torch.device("cpu")), channels_last=False)
    times: dict[int, list[float]] = {}
    for epoch in (0, 1):
        t = time.perf_counter()
        for images, _ in loaders.train.epoch(epoch):
            times.setdefault(images.shape[-1], []).append(time.perf_counter() - t)
            t = time.perf_counter()
    first = times[large][:3]
    print(f"dali-cpu, batch {opts.batch}, {opts.threads} threads; epoch 1 at {large} px after epoch 0 at {small} px")
    for size in (small, large):
        steady = statistics.median(times[size][3:])
        print(f"  {size} px: {len(times[size])} batches, steady {1000 * steady:.1f} ms a batch ({opts.batch / steady:.0f} img/s)")
    print(f"  the first 3 batches at {large} px, right after the change: " + ", ".join(f"{1000 * x:.1f} ms" for x in first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
