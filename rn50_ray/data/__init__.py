"""Input pipelines behind one interface: `make_loaders(cfg, shard, per_rank)` returns `Loaders`.

Backends: `synthetic` (random tensors, for throughput), `pytorch` (PIL + torchvision) and,
imported only when chosen, `dali-cpu` / `dali-gpu` (the default where DALI is installed). Every rank gets the same number of
steps per epoch, because Ray's report is a barrier. Batches arrive on the device as
normalized float tensors (channels_last when asked) with int64 labels.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import torch

from rn50_ray.data.folder import check_dataset

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Shard:
    rank: int
    world_size: int
    device: torch.device


@dataclass
class Loaders:
    train: object  # has steps_per_epoch and epoch(epoch, start_step) -> iterator
    val: object  # has batches() -> iterator
    num_classes: int
    train_size: int
    val_size: int
    notes: list[str] = field(default_factory=list)  # lines for the log
    excluded: int = 0  # undecodable files left out before training (--skip-bad-images)
    backend: str = ""  # the resolved backend


class DeviceNormalizer:
    """uint8 NCHW on the host to a normalized float tensor on the device."""

    def __init__(self, device: torch.device, channels_last: bool):
        self.device, self.channels_last = device, channels_last
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = images.to(self.device, non_blocking=True).to(memory_format=fmt).float()
        return x.sub_(self.mean).div_(self.std), labels.to(self.device, non_blocking=True)


class TorchTrain:
    def __init__(self, loader, sampler, normalize: DeviceNormalizer, steps: int):
        self.loader, self.sampler, self.normalize = loader, sampler, normalize
        self.steps_per_epoch = steps
        self.skipped = 0  # undecodable images dropped under --skip-bad-images

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch, start_step)
        for images, labels, bad in self.loader:
            self.skipped += bad
            yield self.normalize(images, labels)


class TorchVal:
    def __init__(self, loader, normalize: DeviceNormalizer):
        self.loader, self.normalize = loader, normalize

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.loader:
            yield self.normalize(images, labels)


def dali_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` is DALI where it is installed (decoding on the GPU when workers have one), else pytorch."""
    if backend != "auto":
        return backend
    if not dali_available():
        return "pytorch"
    return "dali-gpu" if device.type == "cuda" else "dali-cpu"


def make_loaders(
    data_cfg,
    shard: Shard,
    per_rank: int,
    *,
    global_batch: int,
    seed: int,
    channels_last: bool,
    fp16_input: bool = False,
    bad_files: Collection[str] = (),
) -> Loaders:
    """`bad_files` (from `screen.find_bad_images` on the driver) are left out of both splits."""
    backend = resolve_backend(data_cfg.backend, shard.device)
    if backend == "synthetic":
        from rn50_ray.data.synthetic import make_synthetic_loaders

        loaders = make_synthetic_loaders(
            data_cfg, shard, per_rank, global_batch=global_batch, seed=seed, channels_last=channels_last
        )
        loaders.backend = backend
        return loaders
    train_split, val_split = check_dataset(data_cfg.path)
    if bad_files:
        train_split, val_split = train_split.without(bad_files), val_split.without(bad_files)
    steps = len(train_split) // global_batch
    if steps == 0:
        from rn50_ray.errors import DataError

        raise DataError(
            f"{train_split.root}: {len(train_split)} images is less than one global batch "
            f"({global_batch}); lower batch.global_size"
        )
    notes = [
        f"data: {backend} backend, {len(train_split)} train / {len(val_split)} val images, "
        f"{len(train_split.classes)} classes, {steps} steps per epoch"
    ]
    if train_split.ignored or val_split.ignored:
        notes.append(f"data: ignored {train_split.ignored + val_split.ignored} non-image files")
    excluded = train_split.excluded + val_split.excluded
    if excluded:
        notes.append(f"data: skipped {excluded} undecodable images (--skip-bad-images)")
    sizes = (len(train_split.classes), len(train_split), len(val_split))
    if backend in ("dali-cpu", "dali-gpu"):
        from rn50_ray.data import dali

        gpu = backend == "dali-gpu"
        if gpu and shard.device.type != "cuda":
            from rn50_ray.errors import ConfigError

            raise ConfigError("data.backend: dali-gpu needs workers with a GPU (--gpus-per-worker 1); use dali-cpu")
        common = dict(
            rank=shard.rank,
            world=shard.world_size,
            size=data_cfg.image_size,
            device=shard.device,
            gpu=gpu,
            nhwc=channels_last,
            threads=max(data_cfg.loader_workers, 1),
            prefetch=data_cfg.prefetch,
        )
        train = dali.DaliTrain(
            train_split, per_rank=per_rank, steps=steps, area_min=data_cfg.crop_area_min, fp16=fp16_input, seed=seed, **common
        )
        val = dali.DaliVal(val_split, batch=per_rank, crop_ratio=data_cfg.val_crop_ratio, fp16=fp16_input, **common)
        return Loaders(train, val, *sizes, notes, excluded, backend)
    from rn50_ray.data import pytorch as tp

    pin = shard.device.type == "cuda" and data_cfg.pin_memory
    normalize = DeviceNormalizer(shard.device, channels_last)
    tsampler = tp.ShardSampler(len(train_split), shard.rank, shard.world_size, per_rank, steps, seed, shuffle=True)
    vsampler = tp.ShardSampler(len(val_split), shard.rank, shard.world_size, per_rank, 0, seed, shuffle=False)
    workers = data_cfg.loader_workers
    train = tp.make_loader(
        train_split,
        tp.train_transform(data_cfg.image_size, data_cfg.crop_area_min),
        tsampler,
        per_rank,
        workers,
        pin,
        data_cfg.skip_bad_images,
        data_cfg.prefetch,
    )
    val = tp.make_loader(
        val_split,
        tp.val_transform(data_cfg.image_size, data_cfg.val_crop_ratio),
        vsampler,
        per_rank,
        workers,
        pin,
        data_cfg.skip_bad_images,
        data_cfg.prefetch,
    )
    return Loaders(TorchTrain(train, tsampler, normalize, steps), TorchVal(val, normalize), *sizes, notes, excluded, backend)
