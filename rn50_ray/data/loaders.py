"""`make_loaders` and `make_val_batches`: the chosen backend's pipelines over a data folder's listing.

Every rank gets the same number of steps per epoch (Ray's report is a barrier), each holding this rank's
share of the step's global batch as the run plan gives it. Batches arrive on the device as normalized
float tensors (channels_last when asked) with int64 labels. The listing (a Dataset) comes from the folder's
manifest: nothing here scans a folder.
"""

from __future__ import annotations

from collections.abc import Callable

from rn50_ray.core.context import Loaders, ValBatches
from rn50_ray.core.run_plan import RunPlan
from rn50_ray.data.audit import open_sample_log
from rn50_ray.data.backends import resolve_backend
from rn50_ray.data.types import Dataset, Shard, Split
from rn50_ray.errors import ConfigError


def _dali_gpu(backend: str, shard: Shard) -> bool:
    gpu = backend == "dali-gpu"
    if gpu and shard.device.type != "cuda":
        raise ConfigError("data.backend: dali-gpu needs workers with a GPU (--gpus-per-worker 1); use dali-cpu")
    return gpu


def make_loaders(
    cfg, shard: Shard, plan: RunPlan, dataset: Dataset | None, *, channels_last: bool, fp16_input: bool = False
) -> Loaders:
    """The train and val batches of this rank. `plan` is the run's plan at this shard's world size, made from
    `dataset` (already without the files left out); `dataset` is None for the synthetic backend."""
    data_cfg, seed = cfg.data, cfg.system.seed
    backend = resolve_backend(data_cfg.backend, shard.device.type)
    if backend == "synthetic":
        from rn50_ray.data.synthetic import make_synthetic_loaders

        loaders = make_synthetic_loaders(shard, plan, seed=seed, channels_last=channels_last)
        loaders.backend, loaders.classes = backend, tuple(str(i) for i in range(loaders.num_classes))
        return loaders
    train, val = dataset.train, dataset.val
    assert plan.train_images == len(train), "the run plan is not this dataset's"
    log = open_sample_log(data_cfg.sample_log, shard.rank, shard.world_size)
    if backend in ("dali-cpu", "dali-gpu"):
        from rn50_ray.data.dali import make_dali_loaders

        gpu = _dali_gpu(backend, shard)
        loaders = make_dali_loaders(
            data_cfg, shard, plan, train, val, gpu=gpu, seed=seed, channels_last=channels_last, fp16_input=fp16_input, log=log
        )
    else:
        from rn50_ray.data.pytorch import make_pytorch_loaders

        loaders = make_pytorch_loaders(data_cfg, shard, plan, train, val, seed=seed, channels_last=channels_last, log=log)
    loaders.backend, loaders.classes, loaders.class_names = backend, train.classes, train.names
    loaders.sample_log = log
    loaders.excluded = train.excluded + val.excluded
    loaders.notes = [
        f"data: {backend} backend, {len(train)} train / {len(val)} val images, {len(train.classes)} classes, "
        f"{plan.steps_per_epoch} steps per epoch"
    ]
    if train.ignored or val.ignored:
        loaders.notes.append(f"data: ignored {train.ignored + val.ignored} non-image files")
    if loaders.excluded:
        loaders.notes.append(f"data: skipped {loaders.excluded} undecodable images (--skip-bad-images)")
    return loaders


def make_val_batches(
    cfg, shard: Shard, plan: RunPlan, val: Split, *, channels_last: bool, fp16_input: bool = False
) -> ValBatches:
    """The val split alone (evaluate): no train pipeline, and nothing of the train split is read."""
    backend = resolve_backend(cfg.data.backend, shard.device.type)
    if backend in ("dali-cpu", "dali-gpu"):
        from rn50_ray.data.dali import make_dali_val

        gpu = _dali_gpu(backend, shard)
        return make_dali_val(cfg.data, shard, plan, val, gpu=gpu, fp16_input=fp16_input, channels_last=channels_last)
    from rn50_ray.data.pytorch import make_pytorch_val

    return make_pytorch_val(cfg.data, shard, plan, val, channels_last=channels_last)


def open_loaders(
    cfg, shard: Shard, *, channels_last: bool, fp16_input: bool = False, log: Callable[[str], None] = print
) -> tuple[RunPlan, Loaders]:
    """The plan and loaders of one rank, outside Ray (bench, evaluate-like scripts, tests): the folder's manifest
    read (or built once), its unusable files handled as the driver does."""
    from rn50_ray.data.checks import plan_for, usable_dataset

    dataset = usable_dataset(cfg, log=log)
    plan = plan_for(cfg, dataset, shard.world_size)
    return plan, make_loaders(cfg, shard, plan, dataset, channels_last=channels_last, fp16_input=fp16_input)
