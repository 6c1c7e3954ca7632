"""`make_loaders`: the checks every backend shares, then the chosen backend's own factory.

Every rank gets the same number of steps per epoch (Ray's report is a barrier), each holding this rank's
share of the step's global batch as the batch plan gives it. Batches arrive on the device as normalized
float tensors (channels_last when asked) with int64 labels.
"""

from __future__ import annotations

from collections.abc import Collection

from rn50_ray.core.batching import BatchPlan
from rn50_ray.core.resolution import ResolutionSchedule
from rn50_ray.data.audit import open_sample_log
from rn50_ray.data.backends import resolve_backend
from rn50_ray.data.folder import check_batch_fits, check_dataset
from rn50_ray.data.types import Loaders, Shard
from rn50_ray.errors import ConfigError


def make_loaders(
    data_cfg,
    shard: Shard,
    plan: BatchPlan,
    *,
    seed: int,
    channels_last: bool,
    fp16_input: bool = False,
    bad_files: Collection[str] = (),
    resolution=None,
) -> Loaders:
    """`bad_files` (from `screen.find_bad_images` on the driver) are left out of both splits; `resolution`
    is the `resolution` config section (progressive resizing), or None for data.image_size throughout."""
    backend = resolve_backend(data_cfg.backend, shard.device.type)
    sizes = (
        ResolutionSchedule.from_config(data_cfg.image_size, resolution) if resolution else ResolutionSchedule(data_cfg.image_size)
    )
    val_size = data_cfg.val_image_size or data_cfg.image_size
    val_batch = data_cfg.val_batch or plan.max_micro  # never more at once than a training micro-batch
    if backend == "synthetic":
        from rn50_ray.data.synthetic import make_synthetic_loaders

        loaders = make_synthetic_loaders(
            data_cfg, shard, plan, seed=seed, channels_last=channels_last, size_at=sizes.at, val_batch=val_batch
        )
        loaders.backend, loaders.classes = backend, tuple(str(i) for i in range(loaders.num_classes))
        return loaders
    train, val = check_dataset(data_cfg.path)
    if bad_files:
        train, val = train.without(bad_files), val.without(bad_files)
    steps = check_batch_fits(train, plan.global_size)
    log = open_sample_log(data_cfg.sample_log, shard.rank, shard.world_size)
    common = dict(
        steps=steps, seed=seed, channels_last=channels_last, val_batch=val_batch, size_at=sizes.at, val_size=val_size, log=log
    )
    if backend in ("dali-cpu", "dali-gpu"):
        from rn50_ray.data.dali import make_dali_loaders

        gpu = backend == "dali-gpu"
        if gpu and shard.device.type != "cuda":
            raise ConfigError("data.backend: dali-gpu needs workers with a GPU (--gpus-per-worker 1); use dali-cpu")
        loaders = make_dali_loaders(data_cfg, shard, plan, train, val, gpu=gpu, fp16_input=fp16_input, **common)
    else:
        from rn50_ray.data.pytorch import make_pytorch_loaders

        loaders = make_pytorch_loaders(data_cfg, shard, plan, train, val, **common)
    loaders.backend, loaders.classes, loaders.class_names = backend, train.classes, train.names
    loaders.excluded = train.excluded + val.excluded
    loaders.notes = [
        f"data: {backend} backend, {len(train)} train / {len(val)} val images, {len(train.classes)} classes, "
        f"{steps} steps per epoch"
    ]
    if train.ignored or val.ignored:
        loaders.notes.append(f"data: ignored {train.ignored + val.ignored} non-image files")
    if loaders.excluded:
        loaders.notes.append(f"data: skipped {loaders.excluded} undecodable images (--skip-bad-images)")
    return loaders
