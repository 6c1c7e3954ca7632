"""`launch.py tune` on a real local Ray: trials are Ray Train runs on the CPU sample, tracked in MLflow."""

import csv

import pytest
import yaml
from conftest import FAST, ROOT, launch

pytestmark = pytest.mark.ray


def test_asha_search_stops_weak_trials_and_names_the_best(tiny_data, tmp_path):
    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    # Deterministic on purpose: two sane LRs start first (2 at a time, grid order), so one of them sets ASHA's
    # cutoff at epoch 1 before the two huge LRs get there; those blow val loss up tenfold and must stop early.
    # Val loss, not top-1: 12 steps on the tiny set leave top-1 near chance, where ties would hide the cut.
    space.update(metric="val/loss", mode="min", search="grid", num_samples=1)
    space["params"] = {"optim.lr_per_256": {"grid": [0.05, 0.1, 1.5, 2.0]}}
    space["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 3}
    space["base"]["schedule"] = {"epochs": 3, "warmup_epochs": 0}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    out = launch("tune", "--space", path, *FAST, "--data", tiny_data, "--storage", tmp_path / "runs", "--name", "asha")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    search = tmp_path / "runs" / "asha"
    rows = list(csv.DictReader((search / "results.csv").open()))
    assert len(rows) == 4 and all(r["status"] in ("FINISHED", "STOPPED") for r in rows), rows
    huge = [r for r in rows if float(r["optim.lr_per_256"]) > 1]
    assert all(r["status"] == "STOPPED" and int(r["epochs"]) == 1 for r in huge), rows  # ASHA cut them at epoch 1
    loss = [float(r["val/loss"]) for r in rows]
    assert loss == sorted(loss)  # ranked, best first
    assert float(rows[0]["optim.lr_per_256"]) < 1
    assert f"best trial: {rows[0]['trial']}" in out.stdout
    best = yaml.safe_load((search / "best_config.yaml").read_text())
    assert best["optim"]["lr_per_256"] == pytest.approx(float(rows[0]["optim.lr_per_256"]))
    assert len(list((search / "trials").iterdir())) == 4  # a run folder per trial

    from mlflow import MlflowClient

    store = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = store.search_runs([store.get_experiment_by_name("rn50-ray").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert parents[0].data.tags["best_trial"] == rows[0]["trial"]
    # Trials that ran to the end closed their own runs; the search's driver closed those ASHA killed.
    status = {c.info.run_name.removeprefix("trial_"): c.info.status for c in children}
    assert status == {r["trial"]: "FINISHED" if r["status"] == "FINISHED" else "KILLED" for r in rows}, status
    assert all("rn50.stopped" in c.data.tags for c in children if c.info.status == "KILLED")
    # max_concurrent_trials: 2 holds: no moment has three child runs open at once.
    spans = [(c.info.start_time, c.info.end_time) for c in children]
    assert all(sum(s <= t < e for s, e in spans) <= 2 for t, _ in spans), spans


def test_a_trial_bigger_than_the_cluster_fails_before_any_trial(tiny_data, tmp_path):
    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    space["resources"] = {"workers": "8"}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    out = launch("tune", "--space", path, *FAST, "--data", tiny_data, "--storage", tmp_path / "runs")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert f"{path}: resources: one trial needs 8 CPUs and 0 GPUs (8 workers), but the Ray cluster has 2 CPUs" in last
    assert not (tmp_path / "runs" / "search-space" / "trials").exists()
