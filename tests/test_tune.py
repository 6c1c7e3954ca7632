"""`launch.py tune` on a real local Ray: trials are Ray Train runs on the CPU sample, tracked in MLflow."""

import csv

import pytest
import yaml
from conftest import FAST, ROOT, launch

pytestmark = pytest.mark.ray


def test_asha_search_stops_weak_trials_and_names_the_best(tiny_data, tmp_path):
    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    space["params"]["optim.lr_per_256"] = {"loguniform": [0.01, 3.0]}  # some trials surely learn badly
    space["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 3}
    space["base"]["schedule"]["epochs"] = 3
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    out = launch("tune", "--space", path, *FAST, "--data", tiny_data, "--storage", tmp_path / "runs", "--name", "asha")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    search = tmp_path / "runs" / "asha"
    rows = list(csv.DictReader((search / "results.csv").open()))
    assert len(rows) == 4 and all(r["status"] in ("FINISHED", "STOPPED") for r in rows), rows
    assert any(r["status"] == "STOPPED" and int(r["epochs"]) < 3 for r in rows), rows  # ASHA stopped one early
    top1 = [float(r["val/top1"]) for r in rows]
    assert top1 == sorted(top1, reverse=True)  # ranked
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
