"""`data.sample_log`: which images every step trained on, per rank, for audits of elastic runs.

Off by default. Given a local folder, each rank of each worker-group start appends one JSON line per step to
`rank<R>-pid<PID>.jsonl`: {"epoch", "step", "world_size", "rank", "indices"}, the dataset indices (in the
manifest's train list) of the images the loader handed over for a step that committed, with the world size and
rank of that step's share (under --fault-tolerance replica, the participants'). A restart or a resize shows as a
new file, so the lines of the last start to train a step tell what the model learned from. At each epoch's end
each rank also appends a digest of its weights to `weights-pid<PID>.jsonl`: every rank of a healthy run has the
same.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path


class SampleLog:
    def __init__(self, folder: str, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.folder = Path(folder)
        self.file = open(self.folder / f"rank{rank}-pid{os.getpid()}.jsonl", "a", buffering=1)

        self.pending: str | None = None

    def write(self, epoch: int, step: int, indices: Iterable[int]) -> None:
        """The images of a step as the loader hands them over; written once the step commits."""
        record = {"epoch": epoch, "step": step, "world_size": self.world_size, "rank": self.rank}
        self.pending = json.dumps({**record, "indices": [int(i) for i in indices]}) + "\n"

    def commit(self) -> None:
        """The step counts: its line goes to the file (a step trained again after a failed commit logs once)."""
        if self.pending is not None:
            self.file.write(self.pending)
            self.pending = None

    def weights(self, step: int, model_state: dict) -> None:
        """A digest of the weights after `step` (each epoch's end): equal on every rank of a healthy run."""
        import torch

        digest = hashlib.sha1()
        for name, tensor in model_state.items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        with open(self.folder / f"weights-pid{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "weights": digest.hexdigest()}) + "\n")


def open_sample_log(folder: str, rank: int, world_size: int) -> SampleLog | None:
    return SampleLog(folder, rank, world_size) if folder else None
