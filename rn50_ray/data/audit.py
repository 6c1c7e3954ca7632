"""`data.sample_log`: which images every step trained on, per rank, for audits of elastic runs.

Off by default. Given a local folder, each rank of each worker-group start appends one JSON line per step to
`rank<R>-pid<PID>.jsonl`: {"epoch", "step", "world_size", "rank", "indices"}, the dataset indices (in the
sorted train file list) of the images the loader actually handed over. A restart or a resize shows as a new
file, so the lines of the last start to train a step tell what the model learned from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


class SampleLog:
    def __init__(self, folder: str, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(folder) / f"rank{rank}-pid{os.getpid()}.jsonl", "a", buffering=1)

    def write(self, epoch: int, step: int, indices: Iterable[int]) -> None:
        record = {"epoch": epoch, "step": step, "world_size": self.world_size, "rank": self.rank}
        self.file.write(json.dumps({**record, "indices": [int(i) for i in indices]}) + "\n")


def open_sample_log(folder: str, rank: int, world_size: int) -> SampleLog | None:
    return SampleLog(folder, rank, world_size) if folder else None
