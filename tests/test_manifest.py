"""The dataset manifest (rn50_ray/data/manifest.py): one scan and one screen per version of a data folder, read by
every later command; a changed, unreadable or foreign manifest rebuilt with one line why; a read-only data folder
keeping it under the storage folder; a screen on every core under a progress bar."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import launch

from rn50_ray.data.manifest import MANIFEST_FILE, locations, open_dataset
from rn50_ray.errors import DataError

COLUMNS = ["split", "path", "label", "class", "width", "height", "format", "channels", "bytes", "problem"]


def _open(data, storage=None, **kw):
    lines: list[str] = []
    dataset = open_dataset(str(data), str(storage or data.parent / "runs"), log=lines.append, **kw)
    return dataset, lines


def test_one_scan_per_folder_version_and_every_later_open_reads_it(tiny_data, copy_of):
    data = copy_of(tiny_data)
    first, lines = _open(data)
    assert lines[0] == f"data: no manifest yet: scanning and screening {data} once"
    assert f"data: manifest kept in {data / MANIFEST_FILE}" in lines[-1]
    table = pq.read_table(data / MANIFEST_FILE)
    assert table.column_names == COLUMNS and table.num_rows == 250
    row = table.slice(0, 1).to_pylist()[0]
    assert row["split"] == "train" and row["path"].startswith("train/") and (row["width"], row["height"]) == (32, 32)
    assert row["format"] == "JPEG" and row["channels"] == 3 and row["bytes"] == (data / row["path"]).stat().st_size
    assert row["problem"] == "" and row["class"] == first.train.classes[row["label"]]
    again, lines = _open(data)
    assert lines == [] and again.manifest_id == first.manifest_id  # read: nothing listed, nothing screened
    assert (again.train.paths == first.train.paths).all() and (again.val.labels == first.val.labels).all()


@pytest.mark.parametrize(
    "change, why",
    [
        ("add", "is stale: train/bag/ changed since it was written (a file added, removed or renamed there)"),
        ("delete", "is stale: val/coat/ changed since it was written (a file added, removed or renamed there)"),
        ("new class", "is stale: train/ gained class folders ['zebra'] and lost [] since it was written"),
        ("unreadable", "is unreadable (ArrowInvalid: "),
        ("rescan", "--rescan"),
    ],
)
def test_a_changed_folder_or_a_bad_manifest_is_rebuilt_with_one_line_why(tiny_data, copy_of, change, why):
    data = copy_of(tiny_data)
    _open(data)
    some = sorted((data / "train" / "bag").glob("*.JPEG"))[0]
    if change == "add":
        shutil.copy(some, data / "train" / "bag" / "new.JPEG")
    elif change == "delete":
        sorted((data / "val" / "coat").glob("*.JPEG"))[0].unlink()
    elif change == "new class":
        for split in ("train", "val"):
            (data / split / "zebra").mkdir()
            for i in range(3):
                shutil.copy(some, data / split / "zebra" / f"{i}.JPEG")
    elif change == "unreadable":
        (data / MANIFEST_FILE).write_bytes(b"not parquet at all")
    dataset, lines = _open(data, rescan=change == "rescan")
    assert len(lines) == 3 and why in lines[0] and lines[0].endswith(f": scanning and screening {data} once"), lines
    expected = {"add": (201, 50), "delete": (200, 49), "new class": (203, 53)}.get(change, (200, 50))
    assert (len(dataset.train), len(dataset.val)) == expected
    assert _open(data)[1] == []  # rebuilt and kept: the next open reads it


def test_a_manifest_copied_with_its_folder_is_not_trusted_for_the_copy(tiny_data, tmp_path):
    _open(tiny_data)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)  # the manifest travels along, built for the original
    dataset, lines = _open(copy)
    assert f"was built for {os.path.realpath(tiny_data)}, not {os.path.realpath(copy)}" in lines[0]
    assert dataset.root == str(copy) and dataset.train.file(0).startswith(str(copy))


def test_a_file_rewritten_in_place_is_not_noticed_and_rescan_is_the_remedy(tiny_data, copy_of):
    # Documented: no folder changes, so the manifest stands (the pytorch backend names a size that differs,
    # tests/test_data.py); --rescan reads the new header.
    data = copy_of(tiny_data)
    first, _ = _open(data)
    from PIL import Image

    Image.new("RGB", (64, 48)).save(data / first.train.paths[0])
    same, lines = _open(data)
    assert lines == [] and same.train.widths[0] == 32
    rescanned, _ = _open(data, rescan=True)
    assert (rescanned.train.widths[0], rescanned.train.heights[0]) == (64, 48)


@pytest.fixture
def read_only_copy(tiny_data, tmp_path):
    """The sample on a read-only file system (a tmpfs remounted ro): root can write anywhere else."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root and mount(8): the data folder is a read-only tmpfs")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("needs CAP_SYS_ADMIN to mount a tmpfs")
    try:
        shutil.copytree(tiny_data, mnt / "data", ignore=shutil.ignore_patterns(MANIFEST_FILE))
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt / "data"
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_a_read_only_data_folder_keeps_its_manifest_under_the_storage_folder(read_only_copy, tmp_path):
    storage = tmp_path / "runs"
    _, lines = _open(read_only_copy, storage)
    kept = locations(str(read_only_copy), str(storage))[1]
    assert kept.startswith(f"{storage}/.manifests/") and f"data: manifest kept in {kept}" in lines[-1]
    assert not (read_only_copy / MANIFEST_FILE).exists() and Path(kept).is_file()
    assert _open(read_only_copy, storage)[1] == []  # found there next time


def test_nothing_writable_is_one_line_naming_both_places(read_only_copy, tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    with pytest.raises(DataError, match=r"the data folder's manifest could not be written \(.*; make one of them writable"):
        _open(read_only_copy, blocked)


def test_a_large_cold_screen_runs_on_every_core_under_a_progress_bar(tiny_data, tmp_path):
    # 25,000 hard links to the sample's JPEGs: past the size where the screen starts processes.
    data = tmp_path / "many"
    sources = sorted((tiny_data / "train" / "bag").glob("*.JPEG"))
    for split, per_class in (("train", 2400), ("val", 100)):
        for c in range(10):
            folder = data / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                os.link(sources[i % len(sources)], folder / f"{i}.JPEG")
    out = launch("train", "--recipe", "cpu_demo", "--data", data, "--storage", tmp_path / "runs", "--dry-run")
    assert out.returncode == 0, out.stderr
    cores = len(os.sched_getaffinity(0))
    where = "in this process" if cores == 1 else f"on {cores} processes"
    assert "screened 25,000 images in" in out.stdout and f"s {where}, 0 undecodable" in out.stdout, out.stdout
    assert "screening images: 100%" in out.stderr and "img/s]" in out.stderr  # tqdm: done, with its rate and ETA
    again = launch("train", "--recipe", "cpu_demo", "--data", data, "--storage", tmp_path / "runs", "--dry-run")
    assert "screening" not in again.stdout + again.stderr and "screened" not in again.stdout
    assert "24000 train / 1000 val images" in again.stdout
