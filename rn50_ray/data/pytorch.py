"""The `pytorch` backend: PIL decode, torchvision transforms, DataLoader processes.

Train: RandomResizedCrop (area 0.08-1, aspect 3/4-4/3) and a horizontal flip. Val: resize
the shorter side to image_size / val_crop_ratio, then a center crop. Images travel as uint8
and are normalized on the device, as NVIDIA's loader does.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode, v2

from rn50_ray.data.folder import Split
from rn50_ray.errors import DataError


def train_transform(size: int, area_min: float = 0.08) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(area_min, 1.0), ratio=(3 / 4, 4 / 3), interpolation=InterpolationMode.BILINEAR),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
        ]
    )


def val_transform(size: int, crop_ratio: float) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize(round(size / crop_ratio), interpolation=InterpolationMode.BILINEAR),
            v2.CenterCrop(size),
            v2.PILToTensor(),
        ]
    )


def decode_rgb(path: str) -> Image.Image:
    """Any PIL-readable image as RGB (grayscale, CMYK and palette images included)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e}); remove it or pass --skip-bad-images") from None


class FolderDataset(Dataset):
    """Decodes one sample. Indexed by (seed, index) pairs: the augmentation of a sample then
    depends only on the seed and the index, not on which loader process draws it, so a
    resumed epoch reproduces the interrupted one exactly."""

    def __init__(self, split: Split, transform: v2.Compose, skip_bad: bool = False):
        self.samples, self.transform, self.skip_bad = split.samples, transform, skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        seed, index = key
        path, label = self.samples[index]
        try:
            img = decode_rgb(path)
        except DataError:
            if self.skip_bad:
                return None
            raise
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + index)
            return self.transform(img), label


class ShardSampler(Sampler):
    """This rank's share of one epoch, from `start_step` on.

    torch's DistributedSampler cannot start mid-epoch, hence this one. Rank r takes every
    world_size-th index of a permutation that depends only on (seed, epoch), so optimizer
    step t always covers perm[t*G:(t+1)*G] (G = global batch) whatever the world size: a
    resume on another world size continues with exactly the samples not yet seen.
    """

    def __init__(self, n: int, rank: int, world: int, per_rank: int, steps: int, seed: int, shuffle: bool):
        self.n, self.rank, self.world, self.per_rank, self.steps = n, rank, world, per_rank, steps
        self.seed, self.shuffle = seed, shuffle
        self.epoch = self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        mine = perm[self.rank :: self.world]
        if self.steps:  # train: exactly `steps` full batches on every rank
            mine = mine[self.start_step * self.per_rank : self.steps * self.per_rank]
        return mine.tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        key = self.seed * 10_007 + self.epoch
        return iter([(key, i) for i in self.indices()])

    def __len__(self) -> int:
        return len(self.indices())


def collate_skipping_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    good = [b for b in batch if b is not None]
    if not good:
        raise DataError("a whole batch of images failed to decode")
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    return images, labels, len(batch) - len(good)


def make_loader(
    split: Split,
    transform: v2.Compose,
    sampler: ShardSampler,
    batch: int,
    workers: int,
    pin: bool,
    skip_bad: bool,
    prefetch: int = 2,
) -> DataLoader:
    return DataLoader(
        FolderDataset(split, transform, skip_bad),
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skipping_bad,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch if workers > 0 else None,
    )
