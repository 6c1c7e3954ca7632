"""End to end through `launch.py train`: a real local Ray cluster, 2 CPU workers, gloo, real JPEGs."""

import json
import os
import re
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
    out = launch("train", *FAST, "--data", sample_data, "--storage", storage, "--name", "learn")  # dali-cpu, the default
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return storage / "learn", out


def test_two_workers_learn_well_above_chance(learned):
    run, out = learned
    history = _history(run)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert all(h["world_size"] == 2 for h in history)
    assert history[-1]["val/top1"] >= 40.0, history  # chance is 10%
    assert history[-1]["val/top1"] > history[0]["val/top1"]
    assert "data: dali-cpu backend" in out.stdout
    assert "summary: 6 epochs" in out.stdout and "img/s" in out.stdout and "eta" in out.stdout
    startup = re.search(r"^startup: ([\d.]+) s from launch to the first finished training step$", out.stdout, re.M)
    assert startup and 0 < float(startup[1]) < 300, out.stdout[-2000:]
    assert f"best checkpoint: {run}/best_epoch" in out.stdout
    saved = (run / "config.yaml").read_text()
    assert "lr_per_256: 0.15" in saved and "global_size: 32" in saved


def test_checkpoint_evaluates_outside_ray_as_reported(learned):
    run, _ = learned
    latest = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())[-1]
    out = launch("evaluate", "--checkpoint", latest, "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    last = _history(run)[-1]
    assert result["images"] == 200 and result["epoch"] == 6 and result["image_size"] == 32
    assert abs(result["top1"] - last["val/top1"]) <= 0.5  # at most one of 200 images flips on float noise
    assert result["loss"] == pytest.approx(last["val/loss"], rel=1e-3)
    named = launch("evaluate", "--checkpoint", latest, "--device", "cpu", "--per-class", run / "eval_per_class.csv")
    assert re.search(r"^worst classes: (\S[^%]*) \d+\.\d%, ", named.stdout, re.M), named.stdout  # readable names
    rows = (run / "eval_per_class.csv").read_text().splitlines()
    assert rows[0] == "class,name,images,top1" and "tshirt,T-shirt/top,20," in (run / "eval_per_class.csv").read_text()


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before the kill: {proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    pytest.fail("timed out waiting for the first checkpoint")


STEP_LINE = re.compile(r"epoch (\d+)/\d+ step (\d+)/\d+ loss (\S+)")


def _step_losses(stdout: str) -> dict[tuple[int, int], float]:
    return {(int(e), int(s)): float(loss) for e, s, loss in STEP_LINE.findall(stdout)}


def test_killed_run_resumes_mid_epoch_from_s3_with_the_same_losses_and_mlflow_run(tiny_data, server, s3, monkeypatch):
    # Checkpoints on an S3-protocol server (moto's), addressed by pyarrow's query parameters in the URI; DALI here
    # (the pytorch backend's exact mid-epoch resume is in test_checkpoint.py). 200 images / 32 per step = 6 steps
    # an epoch; a checkpoint every 4 steps lands mid-epoch. The steps trained again after the resume are compared
    # with the killed run's own log of them.
    args = ("train", *FAST, "--backend", "dali-cpu", "--data", tiny_data, "--epochs", "2", "--warmup-epochs", "0.5")
    args += ("--log-every", "1", "--checkpoint-every-steps", "4", "--name", "s3run")
    storage = s3.uri("runs")
    run = s3.uri("runs/s3run")
    args += ("--storage", storage, "--mlflow-uri", server.uri, "--experiment", "killed")
    proc = subprocess.Popen(launch_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**s3.env(), "PYTHONUNBUFFERED": "1"})  # fmt: skip
    before_kill = []
    for line in proc.stdout:  # steps 4 and 8 were checkpointed by the time step 10 is logged
        before_kill.append(line)
        if "epoch 2/2 step 4/6" in line:
            break
    else:
        pytest.fail("the run ended before the kill")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started, at once
    expected = _step_losses("".join(before_kill))
    assert len(expected) == 10
    proc.wait()
    assert any("/checkpoint_epoch0001_step00000008/" in k for k in s3.keys("runs/s3run/"))  # the run lives on S3
    from rn50_ray import run_folder

    for key, value in s3.CREDENTIALS:  # this process reads the run folder through pyarrow too
        monkeypatch.setenv(key, value)
    first_mlflow_run = json.loads(run_folder.read_file(run, "mlflow.json"))["run_id"]
    out = launch(*args, env=s3.env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "(resuming)" in out.stdout and "resumed from" in out.stdout
    resumed = _step_losses(out.stdout.split("resumed from", 1)[1])
    first = min(resumed)
    assert first in {(1, 5), (2, 3)}  # right after the step 4 or step 8 checkpoint, mid-epoch
    assert len(resumed) == 12 - ((first[0] - 1) * 6 + first[1] - 1)  # every remaining step ran once
    again = [key for key in resumed if key in expected]
    assert len(again) >= 2  # steps 9 and 10 at least: trained before the kill, and again after the resume
    for key in again:  # fp32 on CPU: the same batches and weights give the same loss
        assert resumed[key] == pytest.approx(expected[key], abs=2e-4), key
    history = [json.loads(line) for line in run_folder.read_file(run, "metrics.jsonl").splitlines()]
    assert [h["step"] for h in history] == [6, 12]
    assert f"latest checkpoint: {run_folder.join(storage, 's3run', 'checkpoint_epoch0002_step00000012')}" in out.stdout
    assert "tracking: an MLflow store cannot live on" not in out.stdout  # a tracking server was given

    # The best checkpoint's URI, as the summary prints it, evaluates outside Ray to the top-1 the run reported.
    best = re.search(r"^best checkpoint: (\S+) \(val top1 ([\d.]+)%\)$", out.stdout, re.M)
    assert best and best[1].startswith("s3://rn50/runs/s3run/best_epoch") and best[1].endswith("&region=us-east-1"), out.stdout
    evaluated = launch("evaluate", "--checkpoint", best[1], "--json", "--device", "cpu", env=s3.env())
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    best_epoch = max(history, key=lambda h: (h["val/top1"], -h["epoch"]))
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(best_epoch["val/top1"], abs=0.5)

    # The same MLflow run continues, and its history holds every step once.
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    assert f"continuing MLflow run {first_mlflow_run}" in out.stdout
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert mlflow_run.info.run_id == first_mlflow_run and mlflow_run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(first_mlflow_run, "train/loss_step")) == list(range(1, 13))
    assert sorted(m.step for m in client.get_metric_history(first_mlflow_run, "val/top1")) == [6, 12]


@pytest.mark.parametrize("screen", ["true", "false"])
def test_undecodable_image_fails_with_one_line_and_leaves_nothing(tiny_data, copy_of, tmp_path, screen):
    # Screened on the driver by default; unscreened, the DALI worker meets the file and names it.
    data = copy_of(tiny_data)
    bad = data / "val" / "bag" / "broken.JPEG"  # val is read whole, so the file is met for sure
    bad.write_bytes(b"\xff\xd8\xff not really a JPEG")
    runs = tmp_path / "runs"
    out = launch(
        "train",
        *FAST,
        "--data",
        data,
        "--storage",
        runs,
        "--epochs",
        "1",
        "--warmup-epochs",
        "0.5",
        "--set",
        f"data.screen_images={screen}",
    )
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{bad}: cannot decode image" in last and "--skip-bad-images" in last
    left = {p.name for p in runs.iterdir()} if runs.exists() else set()
    assert left <= {"mlflow.db", "mlartifacts"}, left  # no run folder; the embedded MLflow store may stay
    if (runs / "mlflow.db").exists():  # and no MLflow run in it
        from mlflow import MlflowClient

        store = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
        assert not [r for e in store.search_experiments() for r in store.search_runs([e.experiment_id])]


def test_skip_bad_images_trains_and_counts_them(tiny_data, copy_of, tmp_path):
    data = copy_of(tiny_data)
    good = next((data / "train" / "coat").glob("*.JPEG")).read_bytes()
    (data / "train" / "coat" / "cut.JPEG").write_bytes(good[:200])
    (data / "val" / "bag" / "empty.JPEG").write_bytes(b"")
    (data / "train" / "coat" / "notes.txt").write_text("not an image")
    out = launch(
        "train",
        *FAST,
        "--data",
        data,
        "--storage",
        tmp_path,
        "--name",
        "skip",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0.5",
        "--skip-bad-images",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "and screened 252 images in" in out.stdout and "2 undecodable" in out.stdout
    assert "data: skipped 2 undecodable images (--skip-bad-images)" in out.stdout
    assert "data: ignored 1 non-image files" in out.stdout
    assert _history(tmp_path / "skip")[-1]["data/skipped_images"] == 2


def test_more_workers_than_the_cluster_fails_fast(tiny_data, tmp_path):
    start = time.time()
    out = launch("train", *FAST, "--data", tiny_data, "--storage", tmp_path / "runs", "--workers", "16")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "scale.workers: 16 workers need 16 CPU, but the Ray cluster has 2 CPU" in last
    assert time.time() - start < 120
    assert not (tmp_path / "runs").exists()
