"""Storage faults (rn50_ray/storage.py): a stalled object store is ridden out with the default settings, a full disk
and a read-only folder end in one line a user acts on, and nothing half-written is left behind. Real parts: moto's S3
server paused with SIGSTOP, tmpfs file systems mounted for the test (so it needs root and mount(8))."""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest
from conftest import FAST, launch, launch_cmd, watch

from rn50_ray import run_folder
from rn50_ray.errors import StorageError
from rn50_ray.storage import Retrying, describe

STALL = OSError(
    "When uploading part for key 'x': AWS Error NETWORK_CONNECTION during UploadPart operation: curlCode: 28, Timeout was reached"
)


def test_what_is_retried_and_what_is_named():
    assert describe(STALL)[0] is True
    assert describe(OSError("AWS Error SLOW_DOWN during PutObject operation: SlowDown: Please reduce your request rate"))[0]
    assert describe(OSError(errno.ECONNREFUSED, "Connection refused"))[0]
    full = OSError(errno.ENOSPC, "[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert describe(full) == (False, "no space left on device (errno 28)", "free space there")
    assert describe(OSError(errno.EROFS, "Read-only file system"))[:2] == (False, "read-only file system (errno 30)")
    assert describe(OSError("AWS Error NO_SUCH_BUCKET during HeadBucket operation: NoSuchBucket"))[1].startswith("the bucket")
    assert "credentials" in describe(OSError("AWS Error ACCESS_DENIED: InvalidAccessKeyId"))[1]


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_transient_fault_is_waited_for_with_backoff_and_said_once(monkeypatch):
    clock, lines, calls = _Clock(), [], []
    monkeypatch.setattr("rn50_ray.storage.time.monotonic", lambda: clock.now)

    def upload():
        calls.append(clock.now)
        if len(calls) <= 4:
            raise STALL
        return "stored"

    retrying = Retrying("s3://b/runs", 600, lines.append, lambda: "s3://b/runs/r/checkpoint_x")
    assert retrying("checkpoint x", upload, sleep=clock.sleep) == "stored"
    assert [b - a for a, b in itertools.pairwise(calls)] == [1, 2, 4, 8]  # exponential backoff
    assert len(lines) == 2 and lines[0].startswith("storage: waiting for s3://b/runs since ")
    assert "checkpoint x is retried for up to 600 s (run.storage_retry_s)" in lines[0]
    assert lines[1] == "storage: s3://b/runs answered again after 15 s; checkpoint x done"


def test_an_outage_longer_than_the_limit_and_a_full_disk_each_end_in_one_line(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("rn50_ray.storage.time.monotonic", lambda: clock.now)
    retrying = Retrying("s3://b/runs", 60, lambda line: None, lambda: "s3://b/runs/r/checkpoint_epoch0001_step00000031")

    def stalled():
        raise STALL

    with pytest.raises(StorageError, match=r"^s3://b/runs: no answer for 60 s, the run.storage_retry_s limit \(.*curlCode: 28"):
        retrying("checkpoint x", stalled, sleep=clock.sleep)
    assert clock.now - 1000 == 60  # the last wait is cut to the limit

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError) as e:
        retrying("checkpoint x", full, sleep=clock.sleep)
    assert str(e.value) == (
        "s3://b/runs: no space left on device (errno 28); free space there, then run the same command again "
        "(the rerun resumes from s3://b/runs/r/checkpoint_epoch0001_step00000031)"
    )


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size; resize(path, size) and read_only(path) change it."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root and mount(8): the storage is a tmpfs of a set size")
    mounted = []

    class Mounts:
        def mount(self, size: str):
            path = tmp_path / f"tmpfs{len(mounted)}"
            path.mkdir()
            if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode:
                pytest.skip("needs CAP_SYS_ADMIN to mount a tmpfs")
            mounted.append(path)
            return path

        def remount(self, path, options: str):
            subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)

    yield Mounts()
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)])


def test_a_failed_write_leaves_no_temporary_file(tmpfs):
    folder = tmpfs.mount("1m")
    with pytest.raises(OSError) as e:
        run_folder.write_file(str(folder / "run"), "metrics.jsonl", "x" * 3_000_000)
    assert e.value.errno == errno.ENOSPC or "No space left" in str(e.value)
    assert sorted(os.listdir(folder / "run")) == []  # no zero-byte .metrics.jsonl.tmp
    (folder / "run" / ".tmp_checkpoint_epoch0001_step00000010").mkdir()  # what a killed writer left
    (folder / "run" / ".config.yaml.tmp").write_text("")
    assert sorted(run_folder.remove_partial(str(folder / "run"))) == [
        ".config.yaml.tmp",
        ".tmp_checkpoint_epoch0001_step00000010",
    ]


@pytest.mark.ray
def test_a_read_only_storage_folder_is_one_line_before_any_worker_starts(tmpfs, sample_data):
    storage = tmpfs.mount("10m")
    tmpfs.remount(storage, "ro")
    out = launch("train", *FAST, "--data", sample_data, "--storage", storage, "--tracking", "off", "--epochs", "1")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {storage}: read-only file system (errno 30); pass a writable --storage"), out.stderr
    assert "Traceback" not in out.stderr and "Started a local Ray instance" not in out.stdout + out.stderr


@pytest.mark.ray
def test_a_disk_that_fills_during_a_checkpoint_is_one_line_and_the_rerun_resumes(tmpfs, sample_data):
    # Epoch 1 stores its checkpoint and the best copy (2 x 189 MB); epoch 2's does not fit in 450 MB.
    storage = tmpfs.mount("450m")
    args = ["train", *FAST, "--data", sample_data, "--storage", storage, "--name", "full", "--tracking", "off",
            "--epochs", "2", "--warmup-epochs", "0.5"]  # fmt: skip
    out = launch(*args)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    found = re.fullmatch(
        rf"error: {storage}: no space left on device \(errno 28\); free space there, then run the same command again "
        rf"\(the rerun resumes from {storage}/full/checkpoint_epoch0001_step00000031\); the traceback is in (\S+)",
        last,
    )
    assert found and "No space left on device" in open(found[1]).read(), last
    assert "Traceback" not in out.stderr and "WorkerGroupError" not in out.stderr
    assert not [n for n in os.listdir(storage / "full") if n.startswith(".tmp") or n.endswith(".tmp")]  # nothing half-written
    tmpfs.remount(storage, "size=1g")
    again = launch(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {storage}/full/checkpoint_epoch0001_step00000031" in again.stdout
    assert "summary: 2 epochs, 62 steps" in again.stdout


@pytest.mark.ray
def test_an_object_store_that_stalls_for_a_minute_is_ridden_out_with_the_default_settings(s3, sample_data):
    # moto's server SIGSTOPped just before the step-10 checkpoint, for longer than the S3 client's own timeouts
    # and retries (the upload that Ray's default copy made failed 40 s into such a stall), then resumed.
    uri = s3.uri("stall")
    stall_s = 60.0

    def pause(line, proc):
        os.kill(s3.proc.pid, signal.SIGSTOP)
        threading.Timer(stall_s, os.kill, (s3.proc.pid, signal.SIGCONT)).start()

    cmd = launch_cmd("train", *FAST, "--data", sample_data, "--storage", uri, "--name", "stall", "--tracking", "off",
                     "--epochs", "1", "--warmup-epochs", "0.5", "--log-every", "1", "--checkpoint-every-steps", "10")  # fmt: skip
    env = s3.env()
    t0 = time.time()
    status, out = watch(cmd, [("epoch 1/1 step 8/31", pause)], timeout=600, env=env)
    assert status == 0, out[-4000:]
    waiting = re.search(r"storage: waiting for (\S+) since \d\d:\d\d:\d\d \((.*)\); (.*) is retried for up to 600 s", out)
    assert (
        waiting and waiting[1].startswith("s3://rn50/stall?") and waiting[3] == "checkpoint checkpoint_epoch0000_step00000010"
    ), out[-3000:]
    back = re.search(r"storage: \S+ answered again after (\d+) s; checkpoint checkpoint_epoch0000_step00000010 done", out)
    assert back and int(back[1]) >= 20, out[-3000:]
    assert "summary: 1 epochs, 31 steps" in out and time.time() - t0 > stall_s
    assert "resumed from" not in out  # no restart: the worker group waited for the store
    stored = re.search(r"checkpoint epoch0000_step00000010: \d+ MB, staged in [\d.]+ s, stored in ([\d.]+) s", out)
    assert stored and float(stored[1]) >= 20, out[-3000:]  # the step waited for the store: the checkpoint is whole
