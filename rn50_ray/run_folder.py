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


def storage_of(run: str) -> str:
    """The storage a run folder lies in (run.storage), for messages about it."""
    return parent(run)


def write_file(run: str, name: str, text: str) -> None:
    """Whole or not at all: a temporary file (`.NAME.tmp`, removed when the write fails), then a rename."""
    fs, base = filesystem(run)
    fs.create_dir(base, recursive=True)
    tmp = f"{base}/.{name}.tmp"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        fs.move(tmp, f"{base}/{name}")  # atomic on local disks; object stores replace whole objects anyway
    except BaseException:
        _remove_quietly(fs, tmp, folder=False)
        raise


def probe(run: str) -> None:
    """Write and remove a small file in the run folder; a local folder the write made is removed again, so that a
    run refused by a later check leaves no folder behind."""
    made = [] if is_remote(run) else [p for p in (os.path.abspath(run), *_ancestors(run)) if not os.path.exists(p)]
    write_file(run, ".rn50-write-check", "ok")
    delete_file(run, ".rn50-write-check")
    for folder in made:  # deepest first
        try:
            os.rmdir(folder)
        except OSError:
            break


def _ancestors(path: str) -> Iterator[str]:
    path = os.path.abspath(path)
    while (up := os.path.dirname(path)) != path:
        yield (path := up)


def delete_file(run: str, name: str) -> None:
    fs, base = filesystem(run)
    fs.delete_file(f"{base}/{name}")


def put_folder(local: str, fs: pafs.FileSystem, dest: str) -> None:
    """Copy a local folder to `dest` on `fs` so that it appears whole or not at all: on a local file system
    through `.tmp_NAME` and a rename; on an object store, where a prefix has no rename, the partial objects
    are removed when the copy fails. A folder of that name is replaced (the same step trained again)."""
    tmp = posixpath.join(posixpath.dirname(dest), f".tmp_{posixpath.basename(dest)}")
    local_fs = isinstance(fs, pafs.LocalFileSystem)
    target = tmp if local_fs else dest
    try:
        fs.create_dir(target, recursive=True)
        pafs.copy_files(local, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        if local_fs:
            if fs.get_file_info(dest).type != pafs.FileType.NotFound:
                fs.delete_dir(dest)
            fs.move(tmp, dest)
    except BaseException:
        _remove_quietly(fs, target, folder=True)
        raise


def _remove_quietly(fs: pafs.FileSystem, path: str, folder: bool) -> None:
    """Best effort: the store that failed the write may refuse the cleanup too; names starting with a dot are
    ignored by every reader, and the next start removes them (remove_partial)."""
    try:
        fs.delete_dir(path) if folder else fs.delete_file(path)
    except OSError:
        pass


def remove_partial(run: str) -> list[str]:
    """Delete what failed writes left in a run folder (`.tmp_*` folders, `.*.tmp` files); their names."""
    fs, base = filesystem(run)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    except (FileNotFoundError, OSError):
        return []
    left = [i for i in infos if i.base_name.startswith(".tmp_") or (i.base_name.startswith(".") and i.base_name.endswith(".tmp"))]
    for info in left:
        _remove_quietly(fs, info.path, folder=info.type == pafs.FileType.Directory)
    return [i.base_name for i in left]


def read_file(run: str, name: str) -> str | None:
    fs, base = filesystem(run)
    try:
        with fs.open_input_stream(f"{base}/{name}") as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def folders(run: str, prefix: str, strict: bool = False) -> list[str]:
    """The names of the run's sub-folders that start with `prefix`, sorted (checkpoints sort by epoch and step).
    A missing run folder has none; a store that fails the listing has none too, unless `strict` (then it raises)."""
    fs, base = filesystem(run)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    except FileNotFoundError:
        return []
    except OSError:
        if strict:
            raise
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
