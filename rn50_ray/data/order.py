"""Which images each rank trains on at each step, and how each is cropped and flipped.

Both are pure functions of (seed, epoch, step or image index), never of the world size or of which loader
process draws a sample. Step t of an epoch covers images order[t*N : (t+1)*N] of that epoch's permutation
(N = global batch), and rank r takes its plan's slice of those; an image's crop and flip depend only on
(seed, epoch, index). So a step holds the same images, augmented alike, at every world size, and a run
resumed mid-epoch on any number of workers trains exactly the images the epoch has not yet trained.

numpy and the standard library only: DALI's reader processes import this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rn50_ray.core.batching import BatchPlan
from rn50_ray.core.seeds import seed_for

RATIO = (3 / 4, 4 / 3)  # aspect ratios of the random-resized crop (torchvision's and NVIDIA's)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of the n training images."""
    return np.random.default_rng(seed_for("order", seed, epoch)).permutation(n)


def step_indices(order: np.ndarray, plan: BatchPlan, rank: int, step: int) -> np.ndarray:
    """The image indices rank `rank` trains on at `step` of the epoch whose permutation is `order`."""
    start = step * plan.global_size + plan.offset(rank)
    return order[start : start + plan.share(rank)]


@dataclass(frozen=True)
class Crop:
    left: int
    top: int
    width: int
    height: int
    flip: bool


def random_resized_crop(seed: int, epoch: int, index: int, width: int, height: int, area_min: float) -> Crop:
    """torchvision's RandomResizedCrop window (area fraction area_min..1, aspect 3/4..4/3, ten tries, then
    a centre crop) and a coin-flip mirror, drawn from a generator seeded by (seed, epoch, index)."""
    rng = np.random.default_rng(seed_for("crop", seed, epoch, index))
    flip = bool(rng.integers(2))
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(area_min, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return Crop(left, top, w, h, flip)
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return Crop((width - w) // 2, (height - h) // 2, w, h, flip)
