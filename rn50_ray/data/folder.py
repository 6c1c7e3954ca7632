"""The ImageNet folder layout, DATA/{train,val}/<class>/<image> and DATA/classes.json, listed once per folder version.

Classes are the sorted folder names, as torchvision's ImageFolder has them, so every backend gives the same
labels. Files whose extension is not an image's are ignored and counted. Symbolic links are followed (a class
folder on another disk keeps working), but a link that leads back into a folder being walked is an error that
names it, and a file reached twice through links counts once. `classes.json` (written by prepare-imagenet)
maps class folder names to readable names ("n01440764" -> "tench, Tinca tinca").

The walk reads directory entries only: no stat per file (`DirEntry` knows a regular file from its type), and
a real path only where a symbolic link was met. It also records every folder's mtime: a file added, removed
or renamed changes its folder's, which is how the manifest (manifest.py) knows a folder changed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rn50_ray.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLASS_NAMES_FILE = "classes.json"
SPLITS = ("train", "val")


@dataclass
class SplitScan:
    classes: tuple[str, ...]
    paths: list[str]  # relative to the data folder: "train/n01440764/x.JPEG"
    labels: list[int]
    ignored: int = 0  # files skipped for their extension
    duplicates: int = 0  # files reached a second time through a symbolic link, counted once


@dataclass
class FolderScan:
    root: str  # the data folder, absolute
    splits: dict[str, SplitScan]
    folders: dict[str, int] = field(default_factory=dict)  # every folder walked (relative) -> mtime_ns


def check_root(root: str | os.PathLike) -> Path:
    if not str(root):
        raise DataError("data.path: no data folder given (use --data DIR)")
    if not Path(root).is_dir():
        raise DataError(f"{root}: data folder not found")
    return Path(os.path.abspath(root))


def split_classes(root: Path, split: str) -> tuple[str, ...]:
    """The class folders of DATA/split, sorted: one directory listing."""
    base = root / split
    if not base.is_dir():
        raise DataError(f"{base}: missing; expected {split}/<class>/<image> folders under {root}")
    classes = tuple(sorted(e.name for e in os.scandir(base) if e.is_dir()))
    if not classes:
        raise DataError(f"{base}: no class folders; expected {split}/<class>/<image>")
    return classes


def scan_folder(root: str | os.PathLike) -> FolderScan:
    """List train/ and val/, checking that they hold the same classes and that no class folder is empty."""
    base = check_root(root)
    scan = FolderScan(str(base), {})
    for split in SPLITS:
        scan.splits[split] = _scan_split(base, split, scan.folders)
    train, val = scan.splits["train"], scan.splits["val"]
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"{base}: train/ and val/ have different classes (only in train: {only_train[:5]}, only in val: {only_val[:5]})"
        )
    return scan


def _scan_split(root: Path, split: str, folders: dict[str, int]) -> SplitScan:
    classes = split_classes(root, split)
    folders[split] = os.stat(root / split).st_mtime_ns
    out = SplitScan(classes, [], [])
    seen: set[str] | None = None  # real paths, kept only once a symbolic link has been met
    for label, name in enumerate(classes):
        found: list[str] = []
        before = len(out.paths)
        ignored, linked = _walk(root, f"{split}/{name}", found, folders)
        out.ignored += ignored
        if linked and seen is None:  # from here on a file may be reached twice: remember real paths
            seen = {os.path.realpath(root / p) for p in out.paths}
        for rel in found:
            if seen is not None:
                real = os.path.realpath(root / rel)
                if real in seen:
                    out.duplicates += 1
                    continue
                seen.add(real)
            out.paths.append(rel)
            out.labels.append(label)
        if len(out.paths) == before:
            raise DataError(f"{root / split / name}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return out


def _walk(root: Path, rel: str, found: list[str], folders: dict[str, int]) -> tuple[int, bool]:
    """Append every image file under root/rel (relative, sorted) to `found`, following symbolic links; record
    each folder's mtime. Returns (files ignored for their extension, whether a symbolic link was met)."""
    ignored, linked = 0, False

    def visit(path: str, ancestors: tuple[tuple[int, int], ...]) -> None:
        nonlocal ignored, linked
        full = root / path
        st = os.stat(full)
        here = (st.st_dev, st.st_ino)
        if here in ancestors:
            link = next((p for p in (full, *full.parents) if p.is_symlink()), full)
            raise DataError(f"{link}: a symbolic link that leads back into a folder it is inside ({link.resolve()}); remove it")
        folders[path] = st.st_mtime_ns
        with os.scandir(full) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                linked = linked or entry.is_symlink()
                if entry.is_dir(follow_symlinks=True):
                    visit(f"{path}/{entry.name}", (*ancestors, here))
                elif entry.is_file(follow_symlinks=True):
                    if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                        found.append(f"{path}/{entry.name}")
                    else:
                        ignored += 1

    visit(rel, ())
    return ignored, linked


def changed_folder(root: str | os.PathLike, folders: dict[str, int]) -> str | None:
    """The first recorded folder whose mtime differs now (or that is gone), or None: one stat per folder."""
    for rel, mtime in folders.items():
        try:
            if os.stat(Path(root) / rel).st_mtime_ns != mtime:
                return rel
        except OSError:
            return rel
    return None


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
