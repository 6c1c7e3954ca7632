"""The data layer's own shapes: a rank's place (Shard) and a data folder's listing (Dataset of two Splits).

A Split holds its files as numpy arrays (paths relative to the data folder, labels, sizes from the manifest's
screen): ImageNet's 1.33 million files as Python tuples would cost seconds at every worker start.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Shard:
    rank: int
    world_size: int
    device: object  # a torch.device (the data layer's torch-free modules never look inside)


@dataclass(frozen=True, eq=False)
class Split:
    name: str  # train | val
    data_root: str
    classes: tuple[str, ...]
    paths: np.ndarray  # relative to data_root, as str objects
    labels: np.ndarray  # int64
    widths: np.ndarray  # int32, from the file's header
    heights: np.ndarray
    ignored: int = 0  # files skipped for their extension
    duplicates: int = 0  # files reached a second time through a symbolic link, counted once
    excluded: int = 0  # unusable files left out under --skip-bad-images
    names: dict[str, str] = field(default_factory=dict)  # class folder -> readable name (classes.json)

    @property
    def root(self) -> str:
        return os.path.join(self.data_root, self.name)

    def __len__(self) -> int:
        return len(self.paths)

    def file(self, index: int) -> str:
        return os.path.join(self.data_root, self.paths[index])

    def without(self, bad: Collection[str]) -> Split:
        """The split less the files whose relative paths are in `bad`."""
        if not bad:
            return self
        keep = ~np.isin(self.paths, np.asarray(list(bad), dtype=object))
        kept = {k: getattr(self, k)[keep] for k in ("paths", "labels", "widths", "heights")}
        return dataclasses.replace(self, **kept, excluded=self.excluded + int((~keep).sum()))

    def name_of(self, label: int) -> str:
        """A class's readable name where the data has one, else its folder name."""
        folder = self.classes[label]
        return self.names.get(folder, folder)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data folder as its manifest lists it."""

    root: str
    train: Split
    val: Split
    manifest: str  # where the manifest lies (a path or a storage URI)
    manifest_id: str  # which version of it: workers check they read the one the driver checked
    problems: dict[str, tuple[str, str]] = field(default_factory=dict)  # relative path -> (format, screen problem)

    def unusable(self, dali: bool) -> dict[str, str]:
        """{relative path: why} for the files this backend cannot decode."""
        from rn50_ray.data.screen import unusable_for

        return {p: why for p, (fmt, problem) in self.problems.items() if (why := unusable_for(fmt, problem, dali))}

    def without(self, bad: Collection[str]) -> Dataset:
        return dataclasses.replace(self, train=self.train.without(bad), val=self.val.without(bad))
