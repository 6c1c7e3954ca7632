"""Checkpoint state as plain, weights_only-safe types, written atomically.

A checkpoint is a folder holding `state.pt` (model, optimizer, scheduler, scaler, EMA,
progress, RNG states and the resolved config) and `config.yaml`. The model's state dict is the
unwrapped module's, so it has no `module.` prefix and loads with any number of workers, or
outside Ray.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rn50_ray.errors import UserError

STATE_FILE = "state.pt"
FORMAT_VERSION = 1
STAGING_PREFIX = "rn50-ckpt-"
ORPHAN_AGE_S = 3600  # a report stages and hands over in seconds; older folders of dead writers are orphans


@dataclass
class Progress:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps since the start of the run
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    world_size: int = 0  # world size that wrote the checkpoint
    best_top1: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    resizes: list[dict[str, int]] = field(default_factory=list)  # {"step", "old", "new"}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def progress_to_dict(progress: Progress) -> dict[str, Any]:
    return asdict(progress)


def progress_from_dict(data: dict[str, Any]) -> Progress:
    return Progress(**data)


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any], config_yaml: str) -> Path:
    """Write `state` to directory/state.pt through a temporary file and a rename, so a crash
    mid-write leaves either the old file or none, never half of one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {**state, "format_version": FORMAT_VERSION}
    for name, write in ((STATE_FILE, lambda f: torch.save(state, f)), ("config.yaml", lambda f: f.write(config_yaml.encode()))):
        tmp = directory / f".{name}.tmp"
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    return directory


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint folder (or its state.pt) with `weights_only=True`."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no checkpoint here (expected a folder with {STATE_FILE}, or the file itself)")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(
            f"{file}: checkpoint is truncated or not a checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "model" not in state:
        raise UserError(f"{file}: not an rn50-ray checkpoint (format_version {FORMAT_VERSION} expected)")
    return state


def staging_dir() -> tempfile.TemporaryDirectory:
    """A local folder to write a checkpoint in before the runner takes it; named by this process's pid,
    so that one left by a writer killed mid-report (SIGKILL runs no cleanup) can be told apart."""
    return tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-")


def remove_orphaned_staging(root: str | os.PathLike | None = None) -> list[Path]:
    """Delete staging folders whose writer is gone and which are over an hour old (the age guards a live
    writer in another pid namespace sharing this /tmp). Returns what it removed."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        pid = folder.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        try:
            old = time.time() - folder.stat().st_mtime > ORPHAN_AGE_S
        except FileNotFoundError:
            continue
        if pid.isdigit() and old and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
