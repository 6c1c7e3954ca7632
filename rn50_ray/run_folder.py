"""Run folders on any storage: a local path or a pyarrow filesystem URI (s3://, gs://, with or without query
parameters such as `?endpoint_override=HOST:PORT&scheme=http&region=...`). Ray-free, so the CLI, the driver,
the workers and Tune's callbacks share it.

A run folder `STORAGE/NAME` holds `config.yaml`, `metrics.jsonl`, `mlflow.json` and the checkpoint folders
(core/checkpoint.py names them).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs

from rn50_ray.config import absolute, is_remote  # noqa: F401 - part of this module's interface
from rn50_ray.core.checkpoint import BEST_PREFIX, CHECKPOINT_PREFIX


def join(base: str, *names: str) -> str:
    """`base/name/...`, keeping a URI's query string at the end: s3://b/runs?region=x + run -> s3://b/runs/run?region=x."""
    path, sep, query = base.partition("?")
    for name in names:
        path = f"{path.rstrip('/')}/{name}"
    return f"{path}{sep}{query}"


def run_uri(cfg) -> str:
    """The run folder of a resolved config: run.storage/run.name."""
    return join(cfg.run.storage, cfg.run.name)


def parent(uri: str) -> str:
    path, sep, query = uri.partition("?")
    return f"{posixpath.dirname(path.rstrip('/'))}{sep}{query}"


def basename(uri: str) -> str:
    return posixpath.basename(uri.partition("?")[0].rstrip("/"))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path on it, for a local folder or a URI."""
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def write_file(run: str, name: str, text: str) -> None:
    fs, base = filesystem(run)
    fs.create_dir(base, recursive=True)
    tmp = f"{base}/.{name}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, f"{base}/{name}")  # atomic on local disks; object stores replace whole objects anyway


def read_file(run: str, name: str) -> str | None:
    fs, base = filesystem(run)
    try:
        with fs.open_input_stream(f"{base}/{name}") as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def folders(run: str, prefix: str) -> list[str]:
    """The names of the run's sub-folders that start with `prefix`, sorted (checkpoints sort by epoch and step)."""
    fs, base = filesystem(run)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    except (FileNotFoundError, OSError):
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix))


def checkpoints(run: str) -> list[str]:
    return folders(run, CHECKPOINT_PREFIX)


def best_checkpoint(run: str) -> str | None:
    """The URI of the run's `best_*` folder (kept apart from the newest-K checkpoints), if any."""
    names = folders(run, BEST_PREFIX)
    return join(run, names[-1]) if names else None


def remove(run: str) -> None:
    fs, base = filesystem(run)
    try:
        fs.delete_dir(base)
    except (FileNotFoundError, OSError):
        pass


@contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local folder holding `uri`'s files: the folder itself when local, else a temporary download."""
    if not is_remote(uri):
        yield uri
        return
    fs, path = filesystem(uri)
    tmp = tempfile.mkdtemp(prefix="rn50-download-")
    try:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
