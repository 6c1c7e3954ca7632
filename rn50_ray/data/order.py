"""Which images each rank trains on at each step, and how each is cropped and flipped.

Both are pure functions of (seed, epoch, step or image index), never of the world size or of which loader
process draws a sample. Step t of an epoch covers images order[t*N : (t+1)*N] of that epoch's permutation
(N = global batch), and rank r takes its plan's slice of those; an image's crop and flip depend only on
(seed, epoch, index). So a step holds the same images, augmented alike, at every world size, and a run
resumed mid-epoch on any number of workers trains exactly the images the epoch has not yet trained.

numpy and the standard library only.
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


def rank_indices(order: np.ndarray, plan: BatchPlan, rank: int, first_step: int, steps: int) -> np.ndarray:
    """Rank `rank`'s images of steps first_step..steps-1, step after step: step_indices of each, concatenated."""
    n, start = plan.global_size, plan.offset(rank)
    return order[: steps * n].reshape(steps, n)[first_step:, start : start + plan.share(rank)].ravel()


# A counter-based generator, by hand: an image's crop must be a function of (seed, epoch, image) alone, drawn
# for a whole step's images at once. numpy's generators give one stream per seed, not per element; splitmix64's
# finaliser (Steele et al.) over (key, image, draw) gives independent uniform draws per element, vectorised.
_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
TRIES = 10  # torchvision's RandomResizedCrop tries ten windows, then takes a centre crop
_DRAWS = 1 + 4 * TRIES  # the flip, then (area, aspect, top, left) per try


def _uniform(key: int, index: np.ndarray, draws: int) -> np.ndarray:
    """Uniform [0, 1) draws, shape (len(index), draws), each a function of (key, image index, draw)."""
    counter = index.astype(np.uint64)[:, None] * np.uint64(_DRAWS) + np.arange(draws, dtype=np.uint64)[None, :]
    z = np.uint64(key) + (counter + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class Crops:
    """Crop windows and mirror flags of a batch of images: arrays of the batch's length."""

    left: np.ndarray
    top: np.ndarray
    width: np.ndarray
    height: np.ndarray
    flip: np.ndarray  # bool


def random_resized_crops(seed: int, epoch: int, index, width, height, area_min: float) -> Crops:
    """torchvision's RandomResizedCrop windows (area fraction area_min..1, aspect 3/4..4/3, ten tries, then a
    centre crop) and a coin-flip mirror, for images `index` of sizes (`width`, `height`): each image's from
    (seed, epoch, index) alone, whatever else is in the batch."""
    index = np.atleast_1d(np.asarray(index, dtype=np.int64))
    W = np.atleast_1d(np.asarray(width, dtype=np.int64))[:, None]
    H = np.atleast_1d(np.asarray(height, dtype=np.int64))[:, None]
    u = _uniform(seed_for("crop", seed, epoch), index, _DRAWS)
    flip = u[:, 0] < 0.5
    area_u, aspect_u, top_u, left_u = (u[:, 1 + k :: 4] for k in range(4))  # each (n, TRIES)
    target = W * H * (area_min + (1.0 - area_min) * area_u)
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * aspect_u)
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.argmax(axis=1)
    rows = np.arange(len(index))
    w, h = w[rows, first], h[rows, first]
    W, H = W[:, 0], H[:, 0]
    top = np.floor(top_u[rows, first] * (H - h + 1)).astype(np.int64)
    left = np.floor(left_u[rows, first] * (W - w + 1)).astype(np.int64)
    # no try fits: torchvision's centre crop at the nearest allowed aspect ratio
    ratio = W / H
    cw = np.where(ratio < RATIO[0], W, np.where(ratio > RATIO[1], np.round(H * RATIO[1]), W)).astype(np.int64)
    ch = np.where(ratio < RATIO[0], np.round(W / RATIO[0]), H).astype(np.int64)
    fallback = ~fits.any(axis=1)
    w, h = np.where(fallback, cw, w), np.where(fallback, ch, h)
    top, left = np.where(fallback, (H - h) // 2, top), np.where(fallback, (W - w) // 2, left)
    return Crops(left, top, w, h, flip)
