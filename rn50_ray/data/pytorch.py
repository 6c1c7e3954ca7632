"""The `pytorch` backend: PIL decode, DataLoader processes, normalization on the device.

Train: each step's images and their random-resized crops and flips come from `order` (pure functions of
seed, epoch, step and image index, the crops from the manifest's image sizes), so a step is the same at any
world size and a resume continues exactly. The crop and the resize are one PIL call (`Image.resize(box=...)`,
antialiased). EXIF orientation is not applied, in any backend: the crop windows are in the stored pixels' frame.
Val: resize the shorter side to size / val_crop_ratio, then a center crop (torchvision). Images travel as uint8
and are normalized on the device, as NVIDIA's loader does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode, v2

from rn50_ray.core.context import Batch, Loaders
from rn50_ray.core.run_plan import RunPlan
from rn50_ray.data import order
from rn50_ray.data.audit import SampleLog
from rn50_ray.data.types import MEAN, STD, Shard, Split
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
    """Decodes one training image and applies the crop and flip its key carries."""

    def __init__(self, split: Split, size_at: Callable[[int], int], skip_bad: bool):
        self.split, self.size_at, self.skip_bad = split, size_at, skip_bad

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int, int, int, int, int, bool]):
        epoch, index, left, top, width, height, flip = key
        path = self.split.file(index)
        img = _decode_or_skip(path, self.skip_bad)
        if img is None:
            return None
        if img.size != (self.split.widths[index], self.split.heights[index]):
            raise DataError(
                f"{path}: {img.width} x {img.height} px, but the data folder's manifest says "
                f"{self.split.widths[index]} x {self.split.heights[index]} (rewritten in place?); rerun with --rescan"
            )
        size = self.size_at(epoch)
        img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + width, top + height))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(img), int(self.split.labels[index]), index


class ValImages(Dataset):
    def __init__(self, split: Split, size: int, crop_ratio: float, skip_bad: bool):
        self.split, self.skip_bad = split, skip_bad
        self.transform = v2.Compose(
            [v2.Resize(round(size / crop_ratio), interpolation=InterpolationMode.BILINEAR), v2.CenterCrop(size)]
        )

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        img = _decode_or_skip(self.split.file(index), self.skip_bad)
        return None if img is None else (_to_tensor(self.transform(img)), int(self.split.labels[index]), index)


class StepSampler(Sampler):
    """This rank's images of each step of an epoch, from `start_step` on, with their crops: one list per step."""

    def __init__(self, split: Split, plan: RunPlan, rank: int, seed: int, area_min: float):
        self.split, self.plan, self.rank, self.seed, self.area_min = split, plan, rank, seed, area_min
        self.steps = plan.steps_per_epoch
        self.epoch = self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def set_share(self, plan: RunPlan, rank: int) -> None:
        self.plan, self.rank = plan, rank  # read at the next iteration: no new worker processes

    def __iter__(self) -> Iterator[list[tuple]]:
        perm = order.epoch_order(len(self.split), self.seed, self.epoch)
        for step in range(self.start_step, self.steps):
            idx = order.step_indices(perm, self.plan.batch, self.rank, step)
            c = order.random_resized_crops(
                self.seed, self.epoch, idx, self.split.widths[idx], self.split.heights[idx], self.area_min
            )
            yield [
                (self.epoch, int(i), int(x), int(y), int(w), int(h), bool(f))
                for i, x, y, w, h, f in zip(idx, c.left, c.top, c.width, c.height, c.flip, strict=True)
            ]

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

    def set_share(self, plan: RunPlan, rank: int) -> None:
        self.sampler.set_share(plan, rank)
        if self.log:
            self.log.rank, self.log.world_size = rank, plan.world_size

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch, start_step)
        for step, (images, labels, indices, bad) in enumerate(self.loader, start_step):
            self.skipped += bad
            if self.log:
                self.log.write(epoch, step, indices)
            yield self.normalize(images, labels)


class ValSampler(Sampler):
    """Every world_size-th val image from `rank` on: each read once over the ranks; the share can change."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


class TorchVal:
    def __init__(self, loader: DataLoader, sampler: ValSampler, normalize: DeviceNormalizer):
        self.loader, self.sampler, self.normalize = loader, sampler, normalize

    def set_share(self, rank: int, world_size: int) -> None:
        self.sampler.rank, self.sampler.world_size = rank, world_size  # read at the next iteration

    def batches(self) -> Iterator[Batch]:
        for images, labels, _, _ in self.loader:
            yield self.normalize(images, labels)


def _loader_options(data_cfg, shard: Shard) -> dict:
    workers = data_cfg.loader_workers
    return dict(
        num_workers=workers,
        collate_fn=collate_skipping_bad,
        pin_memory=shard.device.type == "cuda" and data_cfg.pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=data_cfg.prefetch if workers > 0 else None,
    )


def make_pytorch_val(data_cfg, shard: Shard, plan: RunPlan, val: Split, *, channels_last: bool) -> TorchVal:
    mine = ValSampler(len(val), shard.rank, shard.world_size)
    images = ValImages(val, plan.val_size, data_cfg.val_crop_ratio, data_cfg.skip_bad_images)
    loader = DataLoader(images, batch_size=plan.val_batch, sampler=mine, **_loader_options(data_cfg, shard))
    return TorchVal(loader, mine, DeviceNormalizer(shard.device, channels_last))


def make_pytorch_loaders(
    data_cfg, shard: Shard, plan: RunPlan, train: Split, val: Split, *, seed: int, channels_last: bool, log: SampleLog | None
) -> Loaders:
    sampler = StepSampler(train, plan, shard.rank, seed, data_cfg.crop_area_min)
    images = TrainImages(train, plan.sizes.at, data_cfg.skip_bad_images)
    train_loader = DataLoader(images, batch_sampler=sampler, **_loader_options(data_cfg, shard))
    normalize = DeviceNormalizer(shard.device, channels_last)
    return Loaders(
        TorchTrain(train_loader, sampler, normalize, log),
        make_pytorch_val(data_cfg, shard, plan, val, channels_last=channels_last),
        len(train.classes),
        len(train),
        len(val),
    )
