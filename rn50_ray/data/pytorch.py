"""The `pytorch` backend: PIL decode, DataLoader processes, normalization on the device.

Train: each step's images and their random-resized crops and flips come from `order` (pure functions of
seed, epoch, step and image index), so a step is the same at any world size and a resume continues exactly.
The crop and the resize are one PIL call (`Image.resize(box=...)`, antialiased). Val: resize the shorter
side to size / val_crop_ratio, then a center crop (torchvision). Images travel as uint8 and are normalized on
the device, as NVIDIA's loader does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode, v2

from rn50_ray.core.batching import BatchPlan
from rn50_ray.data import order
from rn50_ray.data.audit import SampleLog
from rn50_ray.data.folder import Split
from rn50_ray.data.types import MEAN, STD, Batch, Loaders, Shard
from rn50_ray.errors import DataError


def decode_rgb(path: str) -> Image.Image:
    """Any PIL-readable image as RGB (grayscale, CMYK and palette images included). An image over PIL's
    decompression-bomb limit is an error, as the driver's screen says, not a warning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e}); remove it or pass --skip-bad-images") from None


def _decode_or_skip(path: str, skip_bad: bool) -> Image.Image | None:
    """The image, or None for an undecodable one under --skip-bad-images (the collate function drops it)."""
    try:
        return decode_rgb(path)
    except DataError:
        if skip_bad:
            return None
        raise


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


class TrainImages(Dataset):
    """Decodes, crops and flips one training image, keyed by (epoch, index)."""

    def __init__(self, split: Split, seed: int, area_min: float, size_at: Callable[[int], int], skip_bad: bool):
        self.samples, self.seed, self.area_min, self.size_at, self.skip_bad = split.samples, seed, area_min, size_at, skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        path, label = self.samples[index]
        img = _decode_or_skip(path, self.skip_bad)
        if img is None:
            return None
        c = order.random_resized_crop(self.seed, epoch, index, img.width, img.height, self.area_min)
        size = self.size_at(epoch)
        img = img.resize((size, size), Image.BILINEAR, box=(c.left, c.top, c.left + c.width, c.top + c.height))
        if c.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(img), label, index


class ValImages(Dataset):
    def __init__(self, split: Split, size: int, crop_ratio: float, skip_bad: bool):
        self.samples, self.skip_bad = split.samples, skip_bad
        self.transform = v2.Compose(
            [v2.Resize(round(size / crop_ratio), interpolation=InterpolationMode.BILINEAR), v2.CenterCrop(size)]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = _decode_or_skip(path, self.skip_bad)
        return None if img is None else (_to_tensor(self.transform(img)), label, index)


class StepSampler(Sampler):
    """This rank's images of each step of an epoch, from `start_step` on: one list per optimizer step."""

    def __init__(self, n: int, plan: BatchPlan, rank: int, steps: int, seed: int):
        self.n, self.plan, self.rank, self.steps, self.seed = n, plan, rank, steps, seed
        self.epoch = self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = order.epoch_order(self.n, self.seed, self.epoch)
        for step in range(self.start_step, self.steps):
            yield [(self.epoch, int(i)) for i in order.step_indices(perm, self.plan, self.rank, step)]

    def __len__(self) -> int:
        return self.steps - self.start_step


def collate_skipping_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    good = [b for b in batch if b is not None]
    if not good:
        raise DataError("a whole batch of images failed to decode")
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    return images, labels, [b[2] for b in good], len(batch) - len(good)


class DeviceNormalizer:
    """uint8 NCHW on the host to a normalized float tensor on the device."""

    def __init__(self, device: torch.device, channels_last: bool):
        self.device, self.channels_last = device, channels_last
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = images.to(self.device, non_blocking=True).to(memory_format=fmt).float()
        return x.sub_(self.mean).div_(self.std), labels.to(self.device, non_blocking=True)


class TorchTrain:
    def __init__(self, loader: DataLoader, sampler: StepSampler, normalize: DeviceNormalizer, log: SampleLog | None):
        self.loader, self.sampler, self.normalize, self.log = loader, sampler, normalize, log
        self.steps_per_epoch = sampler.steps
        self.skipped = 0  # undecodable images dropped under --skip-bad-images

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch, start_step)
        for step, (images, labels, indices, bad) in enumerate(self.loader, start_step):
            self.skipped += bad
            if self.log:
                self.log.write(epoch, step, indices)
            yield self.normalize(images, labels)


class TorchVal:
    def __init__(self, loader: DataLoader, normalize: DeviceNormalizer):
        self.loader, self.normalize = loader, normalize

    def batches(self) -> Iterator[Batch]:
        for images, labels, _, _ in self.loader:
            yield self.normalize(images, labels)


def make_pytorch_loaders(
    data_cfg,
    shard: Shard,
    plan: BatchPlan,
    train: Split,
    val: Split,
    *,
    steps: int,
    seed: int,
    channels_last: bool,
    val_batch: int,
    size_at: Callable[[int], int],
    val_size: int,
    log: SampleLog | None,
) -> Loaders:
    pin = shard.device.type == "cuda" and data_cfg.pin_memory
    workers, skip = data_cfg.loader_workers, data_cfg.skip_bad_images
    common = dict(
        num_workers=workers,
        collate_fn=collate_skipping_bad,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=data_cfg.prefetch if workers > 0 else None,
    )
    sampler = StepSampler(len(train), plan, shard.rank, steps, seed)
    train_loader = DataLoader(TrainImages(train, seed, data_cfg.crop_area_min, size_at, skip), batch_sampler=sampler, **common)
    mine = list(range(shard.rank, len(val), shard.world_size))  # val: every world_size-th image, read once
    val_loader = DataLoader(ValImages(val, val_size, data_cfg.val_crop_ratio, skip), batch_size=val_batch, sampler=mine, **common)
    normalize = DeviceNormalizer(shard.device, channels_last)
    return Loaders(
        TorchTrain(train_loader, sampler, normalize, log),
        TorchVal(val_loader, normalize),
        len(train.classes),
        len(train),
        len(val),
    )
