"""The ImageNet folder layout: DATA/{train,val}/<class>/<image>. Checked once on the driver.

Classes are the sorted folder names, as torchvision's ImageFolder has them, so every backend
gives the same labels. Files whose extension is not an image's are ignored and counted.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from rn50_ray.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Split:
    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]  # (path, label)
    ignored: int  # files skipped for their extension
    excluded: int = 0  # undecodable files left out under --skip-bad-images

    def __len__(self) -> int:
        return len(self.samples)

    def without(self, bad: Collection[str]) -> Split:
        bad = set(bad)
        kept = tuple(s for s in self.samples if s[0] not in bad)
        return dataclasses.replace(self, samples=kept, excluded=self.excluded + len(self.samples) - len(kept))


def scan_split(root: str | os.PathLike, split: str) -> Split:
    base = Path(root) / split
    if not base.is_dir():
        raise DataError(f"{base}: missing; expected {split}/<class>/<image> folders under {root}")
    classes = tuple(sorted(e.name for e in os.scandir(base) if e.is_dir()))
    if not classes:
        raise DataError(f"{base}: no class folders; expected {split}/<class>/<image>")
    samples, ignored = [], 0
    for label, name in enumerate(classes):
        found = 0
        for dirpath, _, files in sorted(os.walk(base / name, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), label))
                    found += 1
                else:
                    ignored += 1
        if not found:
            raise DataError(f"{base / name}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return Split(base, classes, tuple(samples), ignored)


def check_dataset(root: str | os.PathLike) -> tuple[Split, Split]:
    """Scan train/ and val/ and check that they hold the same classes."""
    if not str(root):
        raise DataError("data.path: no data folder given (use --data DIR)")
    if not Path(root).is_dir():
        raise DataError(f"{root}: data folder not found")
    train, val = scan_split(root, "train"), scan_split(root, "val")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"{root}: train/ and val/ have different classes (only in train: {only_train[:5]}, only in val: {only_val[:5]})"
        )
    return train, val


def check_batch_fits(train: Split, global_batch: int) -> int:
    """Steps per epoch, or a DataError when the split holds less than one global batch."""
    steps = len(train) // global_batch
    if steps == 0:
        raise DataError(
            f"{train.root}: {len(train)} images is less than one global batch ({global_batch}); lower batch.global_size"
        )
    return steps
