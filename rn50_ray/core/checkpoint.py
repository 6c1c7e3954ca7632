"""The checkpoint format: what a checkpoint holds, what its folders are called, and how it is written and read.

A checkpoint is a folder `checkpoint_epoch<EEEE>_step<SSSSSSSS>` (the newest K are kept) or, for the best val
top-1 so far, `best_epoch<EEEE>_step<SSSSSSSS>`, holding `state.pt` (model, optimizer, scheduler, scaler, EMA,
progress, RNG states, the resolved config and the class count; plain, weights_only-safe types) and
`config.yaml`. The model's state dict is the unwrapped module's, with no `module.` prefix, so it loads with any
number of workers, or outside Ray. Names sort by epoch and step. No data-loader state is saved: which images
a step trains on is a function of (seed, epoch, step), see rn50_ray/data/order.py.

Writes go through a temporary file and a rename; reads always land on the CPU (`load_state_dict` then copies
into the device's parameters, and the optimizer casts its state to each parameter's device), so RNG states
stay the CPU ByteTensors torch.set_rng_state requires.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import posixpath
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rn50_ray.errors import UserError
from rn50_ray.processes import pid_alive

STATE_FILE = "state.pt"
FORMAT_VERSION = 1
CHECKPOINT_PREFIX = "checkpoint_"
BEST_PREFIX = "best_"
STAGING_PREFIX = "rn50-ckpt-"
ORPHAN_AGE_S = 3600  # a report stages and hands over in seconds; older folders of dead writers are orphans
_STEP = re.compile(r"_step(\d+)$")


def checkpoint_name(epoch: int, step: int) -> str:
    """The name shared by a checkpoint's folders: `checkpoint_<name>` and, when best, `best_<name>`."""
    return f"epoch{epoch:04d}_step{step:08d}"


def step_of(path: str) -> int:
    """The optimizer step in a checkpoint folder's name (…/checkpoint_epoch0002_step00000012 -> 12), also in a
    storage URI with a query (s3://…/checkpoint_…?endpoint_override=…)."""
    match = _STEP.search(path.partition("?")[0].rstrip("/"))
    return int(match[1]) if match else 0


def run_name_of(path: str) -> str:
    """The run folder's name of a checkpoint path or URI (…/trial_x/checkpoint_… -> trial_x)."""
    return posixpath.basename(posixpath.dirname(path.partition("?")[0].rstrip("/")))


@dataclass
class Progress:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps since the start of the run
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    world_size: int = 0  # world size that wrote the checkpoint
    best_top1: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    resizes: list[dict[str, int]] = field(default_factory=list)  # {"step", "old", "new"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# torch is imported in the functions that use it: the CLI, the driver and Tune's callbacks read names and
# list checkpoints through run_folder without paying torch's import.


def rng_state() -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any], config_yaml: str) -> Path:
    """Write `state` to directory/state.pt through a temporary file and a rename, so a crash
    mid-write leaves either the old file or none, never half of one."""
    import torch

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


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint folder (or its state.pt) onto the CPU, with `weights_only=True`."""
    import torch

    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no checkpoint here (expected a folder with {STATE_FILE}, or the file itself)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(
            f"{file}: checkpoint is truncated or not a checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "model" not in state:
        raise UserError(f"{file}: not an rn50-ray checkpoint (format_version {FORMAT_VERSION} expected)")
    return state


def load_first_readable(ctx, resume: str) -> tuple[dict[str, Any], str, contextlib.ExitStack]:
    """(state, path, the stack holding it open): the newest checkpoint that loads, from `resume` then
    `ctx.older_checkpoints()` (a TrainContext). Writes are atomic, but storage can still lose or cut a file;
    an unreadable newest checkpoint falls back to the one before, and says so."""
    stack = contextlib.ExitStack()
    for candidate in itertools.chain([contextlib.nullcontext(resume)], ctx.older_checkpoints()):
        path = stack.enter_context(candidate)
        try:
            return load_checkpoint(path), path, stack
        except UserError as e:
            ctx.log(f"checkpoint unreadable, trying the one before: {e}")
    stack.close()
    raise UserError(f"no readable checkpoint for this run (the newest is {resume}); pass a new --name to start over")


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
        if pid.isdigit() and old and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
