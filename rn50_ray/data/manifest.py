"""The dataset manifest: one scan and one screen per version of a data folder, kept as a Parquet file.

A row per image (split, path relative to the data folder, label, class folder, width, height, format, channels,
bytes, and the screen's reason where the file cannot be decoded), and in the file's metadata the folder it was
built for, its class lists, and the mtime of every folder walked. Every consumer reads it: the driver at each
start, every worker start, restart and resize (workers never scan), every Tune trial, dry-run, bench and
evaluate.

Where: `DATA/.rn50-manifest.parquet`, or where the data folder is not writable, `STORAGE/.manifests/<hash of the
data path>.parquet` (a local folder or a storage URI). prepare-imagenet writes it at the end.

A changed folder is found by its folders' mtimes (one stat per folder: 2,002 for ImageNet): adding, removing or
renaming a file changes its folder's mtime, and so does a new class folder its split's. A file rewritten in place
under the same name changes no folder: it is not noticed (its header size is still the manifest's; the pytorch
backend says so when the sizes differ), so pass --rescan after rewriting files in place. A manifest that is
unreadable, stale or built for another folder is never used: it is rebuilt, with one line saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from rn50_ray import run_folder
from rn50_ray.data.folder import SPLITS, FolderScan, changed_folder, check_root, class_names, scan_folder, split_classes
from rn50_ray.data.screen import DALI_FORMATS, screen_files
from rn50_ray.data.types import Dataset, Split
from rn50_ray.errors import DataError

MANIFEST_FILE = ".rn50-manifest.parquet"
VERSION = 1
META_KEY = b"rn50.manifest"


def locations(root: str, storage: str) -> list[str]:
    """Where a data folder's manifest may be: beside the data, then under the storage folder."""
    key = hashlib.sha1(os.path.realpath(root).encode()).hexdigest()[:16]
    return [os.path.join(root, MANIFEST_FILE), run_folder.join(storage, ".manifests", f"{key}.parquet")]


def _write(table: pa.Table, where: str) -> None:
    """Whole or not at all: a temporary file, then a rename (object stores replace whole objects anyway)."""
    import pyarrow.parquet as pq

    fs, path = run_folder.filesystem(where)
    fs.create_dir(os.path.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp, filesystem=fs, compression="zstd")
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def read_table(where: str) -> pa.Table:
    import pyarrow.parquet as pq

    fs, path = run_folder.filesystem(where)
    return pq.read_table(path, filesystem=fs)


def metadata(table: pa.Table) -> dict[str, Any]:
    return json.loads((table.schema.metadata or {})[META_KEY])


def build(root: str, *, screen: bool = True, workers: int | None = None, log: Callable[[str], None] = print) -> pa.Table:
    """Walk the folder and screen every image: the manifest as a table (not yet written)."""
    t0 = time.perf_counter()
    scan = scan_folder(root)
    listed = time.perf_counter() - t0
    paths = [p for split in SPLITS for p in scan.splits[split].paths]
    t1 = time.perf_counter()
    infos, processes = screen_files(scan.root, paths, full=screen, workers=workers)
    screened = time.perf_counter() - t1
    bad = sum(1 for i in infos if i.problem)
    procs = "in this process" if processes == 1 else f"on {processes} processes"
    log(
        f"data: listed {scan.root} in {listed:.1f} s and {'screened' if screen else 'read the headers of'} {len(paths):,} "
        f"images in {screened:.1f} s {procs}, {bad} undecodable"
    )
    return _table(scan, paths, infos, screen)


def _table(scan: FolderScan, paths: list[str], infos: list, screened: bool) -> pa.Table:
    splits = [s for s in SPLITS for _ in scan.splits[s].paths]
    labels = [label for s in SPLITS for label in scan.splits[s].labels]
    classes = scan.splits["train"].classes
    meta = {
        "version": VERSION,
        "root": os.path.realpath(scan.root),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "screened": screened,
        "classes": list(classes),
        "counts": {s: {"ignored": scan.splits[s].ignored, "duplicates": scan.splits[s].duplicates} for s in SPLITS},
        "folders": scan.folders,
    }
    meta["id"] = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    columns = {
        "split": pa.array(splits).dictionary_encode(),
        "path": pa.array(paths, pa.string()),
        "label": pa.array(labels, pa.int32()),
        "class": pa.array([classes[label] for label in labels]).dictionary_encode(),
        "width": pa.array([i.width for i in infos], pa.int32()),
        "height": pa.array([i.height for i in infos], pa.int32()),
        "format": pa.array([i.format for i in infos]).dictionary_encode(),
        "channels": pa.array([i.channels for i in infos], pa.int8()),
        "bytes": pa.array([i.bytes for i in infos], pa.int64()),
        "problem": pa.array([i.problem for i in infos], pa.string()),
    }
    return pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def stale(table_or_error: pa.Table | str, root: str, screen: bool) -> str | None:
    """Why this manifest must not be used for `root` now, or None."""
    if isinstance(table_or_error, str):
        return f"is unreadable ({table_or_error})"
    try:
        meta = metadata(table_or_error)
    except (KeyError, ValueError, TypeError):
        return "is not an rn50-ray manifest"
    if meta.get("version") != VERSION:
        return f"is of format {meta.get('version')}, not {VERSION}"
    if meta["root"] != os.path.realpath(root):
        return f"was built for {meta['root']}, not {os.path.realpath(root)}"
    if screen and not meta["screened"]:
        return "was built without the image screen (data.screen_images was off)"
    changed = changed_folder(root, meta["folders"])
    if changed is None:
        return None
    if changed in SPLITS:
        try:
            now = set(split_classes(Path(root), changed))
        except DataError as e:
            return f"lists {changed}/, which changed: {e}"
        gained, lost = sorted(now - set(meta["classes"])), sorted(set(meta["classes"]) - now)
        if gained or lost:
            return f"is stale: {changed}/ gained class folders {gained[:3]} and lost {lost[:3]} since it was written"
    return f"is stale: {changed}/ changed since it was written (a file added, removed or renamed there)"


def open_dataset(
    root: str,
    storage: str,
    *,
    rescan: bool = False,
    screen: bool = True,
    log: Callable[[str], None] = print,
    workers: int | None = None,
) -> Dataset:
    """The data folder's listing from its manifest: read where it is current, else built and kept (one line why)."""
    root = str(check_root(root))
    found = _first_existing(locations(root, storage))
    table, why = None, None
    if rescan:
        why = "--rescan"
    elif found is None:
        why = "no manifest yet"
    else:
        try:
            table = read_table(found)
        except Exception as e:  # pyarrow raises several types for a cut or foreign file
            table = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        problem = stale(table, root, screen)
        if problem:
            why, table = f"manifest {found} {problem}", None
    if table is None:
        log(f"data: {why}: scanning and screening {root} once")
        table = build(root, screen=screen, workers=workers, log=log)
        found = write_manifest(table, locations(root, storage), log)
    return dataset_from(table, root, found)


def _first_existing(candidates: list[str]) -> str | None:
    for where in candidates:
        fs, path = run_folder.filesystem(where)
        try:
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                return where
        except OSError:
            continue
    return None


def write_manifest(table: pa.Table, candidates: list[str], log: Callable[[str], None] = lambda line: None) -> str:
    """Write the manifest at the first place that takes it; where it went."""
    errors = []
    for where in candidates:
        try:
            _write(table, where)
            log(f"data: manifest kept in {where} (read by every worker and later run; --rescan rebuilds it)")
            return where
        except OSError as e:
            errors.append(f"{where}: {e}")
    raise DataError(f"the data folder's manifest could not be written ({'; '.join(errors)}); make one of them writable")


def read_dataset(where: str, root: str, manifest_id: str) -> Dataset:
    """A worker's read: the manifest the driver checked, never a scan."""
    try:
        table = read_table(where)
        found = metadata(table)["id"]
    except Exception as e:
        raise DataError(f"{where}: the data folder's manifest cannot be read ({type(e).__name__}); rerun the command") from None
    if found != manifest_id:
        raise DataError(f"{where}: the data folder's manifest changed since this run's driver read it; rerun the command")
    return dataset_from(table, root, where)


def dataset_from(table: pa.Table, root: str, where: str) -> Dataset:
    meta = metadata(table)
    classes, names = tuple(meta["classes"]), class_names(root)
    splits = {}
    is_split = table.column("split").to_numpy(zero_copy_only=False)
    for name in SPLITS:
        rows = table.filter(pa.array(is_split == name))
        counts = meta["counts"][name]
        splits[name] = Split(
            name,
            root,
            classes,
            paths=rows.column("path").to_numpy(zero_copy_only=False),
            labels=rows.column("label").to_numpy().astype(np.int64),
            widths=rows.column("width").to_numpy(),
            heights=rows.column("height").to_numpy(),
            ignored=counts["ignored"],
            duplicates=counts["duplicates"],
            names=names,
        )
    fmt = table.column("format").to_numpy(zero_copy_only=False)
    problem = table.column("problem").to_numpy(zero_copy_only=False)
    odd = np.flatnonzero((problem != "") | ~np.isin(fmt, np.array(sorted(DALI_FORMATS), dtype=object)))
    path = table.column("path")
    problems = {path[int(i)].as_py(): (fmt[i], problem[i]) for i in odd}
    return Dataset(root, splits["train"], splits["val"], where, meta["id"], problems)
