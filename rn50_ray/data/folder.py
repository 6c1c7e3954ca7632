"""The ImageNet folder layout: DATA/{train,val}/<class>/<image>, and DATA/classes.json. Checked once on the driver.

Classes are the sorted folder names, as torchvision's ImageFolder has them, so every backend gives the same
labels. Files whose extension is not an image's are ignored and counted. Symbolic links are followed (a class
folder on another disk keeps working), but a link that leads back into a folder being walked is an error that
names it, and a file reached twice through links counts once. `classes.json` (written by prepare-imagenet)
maps class folder names to readable names ("n01440764" -> "tench, Tinca tinca").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from rn50_ray.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLASS_NAMES_FILE = "classes.json"


@dataclass(frozen=True)
class Split:
    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]  # (path, label)
    ignored: int  # files skipped for their extension
    excluded: int = 0  # undecodable files left out under --skip-bad-images
    duplicates: int = 0  # files reached a second time through a symbolic link, counted once
    names: dict[str, str] = field(default_factory=dict, compare=False)  # class folder -> readable name

    def __len__(self) -> int:
        return len(self.samples)

    def without(self, bad: Collection[str]) -> Split:
        bad = set(bad)
        kept = tuple(s for s in self.samples if s[0] not in bad)
        return dataclasses.replace(self, samples=kept, excluded=self.excluded + len(self.samples) - len(kept))

    def name(self, label: int) -> str:
        """A class's readable name where the data has one, else its folder name."""
        folder = self.classes[label]
        return self.names.get(folder, folder)


def _walk(folder: Path) -> list[str]:
    """Every file under `folder`, following symbolic links, sorted; a link back into the walk is a DataError."""
    files: list[str] = []

    def visit(path: Path, ancestors: tuple[tuple[int, int], ...]) -> None:
        st = path.stat()
        here = (st.st_dev, st.st_ino)
        if here in ancestors:
            link = next((p for p in (path, *path.parents) if p.is_symlink()), path)
            raise DataError(f"{link}: a symbolic link that leads back into a folder it is inside ({link.resolve()}); remove it")
        with os.scandir(path) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=True):
                    visit(Path(entry.path), (*ancestors, here))
                elif entry.is_file(follow_symlinks=True):
                    files.append(entry.path)

    visit(folder, ())
    return files


def class_names(root: str | os.PathLike) -> dict[str, str]:
    file = Path(root) / CLASS_NAMES_FILE
    if not file.is_file():
        return {}
    try:
        names = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{file}: not valid JSON ({e}); expected {{class folder: name}}") from None
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise DataError(f"{file}: expected a mapping of class folder names to readable names")
    return names


def scan_split(root: str | os.PathLike, split: str) -> Split:
    base = Path(root) / split
    if not base.is_dir():
        raise DataError(f"{base}: missing; expected {split}/<class>/<image> folders under {root}")
    classes = tuple(sorted(e.name for e in os.scandir(base) if e.is_dir()))
    if not classes:
        raise DataError(f"{base}: no class folders; expected {split}/<class>/<image>")
    samples, ignored, duplicates, seen = [], 0, 0, set()
    for label, name in enumerate(classes):
        found = 0
        for path in _walk(base / name):
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                ignored += 1
                continue
            real = os.path.realpath(path)
            if real in seen:
                duplicates += 1
                continue
            seen.add(real)
            samples.append((path, label))
            found += 1
        if not found:
            raise DataError(f"{base / name}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return Split(base, classes, tuple(samples), ignored, duplicates=duplicates, names=class_names(root))


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
