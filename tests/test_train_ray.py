"""End to end through `launch.py train`: a real local Ray cluster, 2 CPU workers, gloo, real JPEGs."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import FAST, ROOT, launch, launch_cmd

pytestmark = pytest.mark.ray


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def learned(sample_data, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    out = launch("train", *FAST, "--backend", "pytorch", "--data", sample_data, "--storage", storage, "--name", "learn")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return storage / "learn", out


def test_two_workers_learn_well_above_chance(learned):
    run, out = learned
    history = _history(run)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert all(h["world_size"] == 2 for h in history)
    assert history[-1]["val/top1"] >= 40.0, history  # chance is 10%
    assert history[-1]["val/top1"] > history[0]["val/top1"]
    assert "summary: 6 epochs" in out.stdout and "img/s" in out.stdout and "eta" in out.stdout
    saved = (run / "config.yaml").read_text()
    assert "lr_per_256: 0.15" in saved and "global_size: 32" in saved


def test_checkpoint_evaluates_outside_ray_as_reported(learned):
    run, _ = learned
    latest = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())[-1]
    out = launch("evaluate", "--checkpoint", latest, "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    last = _history(run)[-1]
    assert result["images"] == 200 and result["epoch"] == 6
    assert abs(result["top1"] - last["val/top1"]) <= 0.5  # at most one of 200 images flips on float noise
    assert result["loss"] == pytest.approx(last["val/loss"], rel=1e-3)


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before the kill: {proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    pytest.fail("timed out waiting for the first checkpoint")


def test_killed_run_resumes_from_its_last_checkpoint(tiny_data, tmp_path):
    args = ("train", *FAST, "--data", tiny_data, "--storage", tmp_path, "--epochs", "2", "--warmup-epochs", "0.5")
    proc = subprocess.Popen(
        launch_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    snapshots = lambda: list(tmp_path.glob("*/checkpoint_manager_snapshot.json"))
    _wait_for(lambda: any("checkpoint_epoch0001" in p.read_text() for p in snapshots()), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started, at once
    proc.wait()
    run = snapshots()[0].parent
    assert len(_history(run)) == 1
    out = launch(*args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "(resuming)" in out.stdout and "resumed from" in out.stdout and "epoch 1, step 6" in out.stdout
    assert "epoch 1/2 step" not in out.stdout.split("resumed from", 1)[1]  # epoch 1 was not trained again
    history = _history(run)
    assert [h["epoch"] for h in history] == [1, 2]
    assert [h["step"] for h in history] == [6, 12]  # 200 images / 32 per step = 6 steps an epoch


def test_undecodable_image_fails_with_one_line_and_leaves_nothing(tiny_data, copy_of, tmp_path):
    data = copy_of(tiny_data)
    bad = data / "val" / "bag" / "broken.JPEG"  # val is read whole, so the file is met for sure
    bad.write_bytes(b"\xff\xd8\xff not really a JPEG")
    out = launch("train", *FAST, "--data", data, "--storage", tmp_path / "runs", "--epochs", "2", "--warmup-epochs", "0.5")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{bad}: cannot decode image" in last and "--skip-bad-images" in last
    assert not any((tmp_path / "runs").iterdir())


def test_more_workers_than_the_cluster_fails_fast(tiny_data, tmp_path):
    start = time.time()
    out = launch("train", *FAST, "--data", tiny_data, "--storage", tmp_path / "runs", "--workers", "16")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "scale.workers: 16 workers need 16 CPUs and 0 GPUs, but the Ray cluster has" in last
    assert time.time() - start < 120
    assert not (tmp_path / "runs").exists()


def test_dali_cpu_workers_learn_well_above_chance(sample_data, tmp_path):
    out = launch("train", *FAST, "--backend", "dali-cpu", "--data", sample_data, "--storage", tmp_path, "--name", "dali")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "data: dali-cpu backend" in out.stdout
    history = _history(tmp_path / "dali")
    assert len(history) == 6 and all(h["world_size"] == 2 for h in history)
    assert history[-1]["val/top1"] >= 40.0, history
