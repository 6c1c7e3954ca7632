"""`launch.py tune` on a real local Ray: trials are Ray Train runs on the CPU sample, tracked in MLflow."""

import csv
import io
import signal
from pathlib import Path

import pytest
import yaml
from conftest import FAST, ROOT, launch, launch_cmd, watch

pytestmark = pytest.mark.ray


def smoke_space(tmp_path: Path, epochs: int | None = None, **keys) -> Path:
    """tune_spaces/smoke.yaml with some top-level keys replaced (and its trials' epochs), written for one test."""
    space = {**yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text()), **keys}
    if epochs is not None:
        space["base"] = {"schedule": {"epochs": epochs, "warmup_epochs": 0}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_asha_search_stops_weak_trials_and_names_the_best(tiny_data, copy_of, tmp_path):
    # Deterministic on purpose: two sane LRs start first (2 at a time, grid order), so one of them sets ASHA's
    # cutoff at epoch 1 before the two huge LRs get there; those blow val loss up tenfold and must stop early.
    # Val loss, not top-1: 6 steps an epoch on the tiny set leave top-1 near chance, where ties would hide the cut.
    path = smoke_space(
        tmp_path, 2, metric="val/loss", mode="min", search="grid", num_samples=1,
        params={"optim.lr_per_256": {"grid": [0.05, 0.1, 1.5, 2.0]}},
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 3},
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"  # the command's working directory: nothing of the search may land here
    elsewhere.mkdir()
    data = copy_of(tiny_data)  # a folder whose manifest is not current: the search screens it, once
    args = ("tune", "--space", path, *FAST, "--data", data, "--storage", tmp_path / "runs", "--name", "asha")
    out = launch(*args, cwd=elsewhere)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.count(f"scanning and screening {data} once") == 1  # 4 trials read the search's manifest
    assert list(elsewhere.iterdir()) == []  # no ./mlruns: the artifacts are under --storage
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
    # Artifacts in proportion: the best trial's model, and the other trials' checkpoints as URIs, not copies.
    assert store.get_experiment_by_name("rn50-ray").tags["mlflow.experimentKind"] == "custom_model_development"
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    try:
        models = mlflow.search_logged_models(experiment_ids=[parents[0].info.experiment_id], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    best_run = next(c for c in children if c.info.run_name == f"trial_{rows[0]['trial']}")
    assert [m.source_run_id for m in models] == [best_run.info.run_id]
    for c in children:
        assert "checkpoints" not in {a.path for a in store.list_artifacts(c.info.run_id)}
    assert best_run.data.tags["rn50.best_checkpoint"].startswith(str(search / "trials"))
    artifacts = sum(f.stat().st_size for f in (tmp_path / "runs" / "mlartifacts").rglob("*") if f.is_file())
    assert artifacts < 0.3 * 811e6, artifacts  # one model (about 100 MB), plots and tables


def test_a_trial_bigger_than_the_cluster_fails_before_any_trial(tiny_data, tmp_path):
    path = smoke_space(tmp_path, resources={"workers": "8"})
    out = launch("tune", "--space", path, *FAST, "--data", tiny_data, "--storage", tmp_path / "runs")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert f"{path}: resources: one trial's 8 workers need 8 CPU, but the Ray cluster has 2 CPU" in last
    assert not (tmp_path / "runs" / "search-space" / "trials").exists()


def test_pbt_restarts_a_weak_trial_from_a_better_one_with_perturbed_hyperparameters(tiny_data, tmp_path):
    # Deterministic whichever trial reports first: synchronous PBT decides once both trials have finished epoch 1
    # (the only perturbation point: a trial's last epoch never is one), so the weak trial exploits the strong one.
    mutations = {"optim.lr_per_256": [0.04, 0.05, 0.06]}  # no resampling: explore moves 0.05 to a neighbour
    path = smoke_space(
        tmp_path, 2, metric="val/loss", mode="min", search="grid", num_samples=1,
        params={"optim.lr_per_256": {"grid": [0.05, 2.0]}},  # 2.0 blows val loss up: it must exploit 0.05
        scheduler={
            "type": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5, "resample_probability": 0.0,
            "synch": True, "mutations": mutations,
        },
    )  # fmt: skip
    out = launch("tune", "--space", path, *FAST, "--data", tiny_data, "--storage", tmp_path / "runs", "--name", "pbt")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    search = tmp_path / "runs" / "pbt"
    rows = {float(r["optim.lr_per_256"]): r for r in csv.DictReader((search / "results.csv").open())}
    assert len(rows) == 2 and all(r["status"] == "FINISHED" and r["epochs"] == "2" for r in rows.values()), rows
    assert 2.0 not in rows and 0.05 in rows, rows  # the weak trial now runs with a neighbour of the strong one's LR
    weak = next(r for lr, r in rows.items() if lr in (0.04, 0.06))
    assert float(weak["val/loss"]) < 10, weak  # it carries the strong trial's weights, not its own wrecked ones
    assert f"tune: trial {weak['trial']} continues from trial_{rows[0.05]['trial']} at step" in out.stdout
    assert "with this run's hyperparameters" in out.stdout
    assert len(list((search / "trials").glob(f"trial_{weak['trial']}.pbt-*/checkpoint_*"))) >= 1  # its new segment

    from mlflow import MlflowClient

    store = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = store.search_runs(
        [store.get_experiment_by_name("rn50-ray").experiment_id], f"attributes.run_name = 'trial_{weak['trial']}'"
    )
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr_per_256"] == "2.0"  # params stay the first config; changes are metrics
    assert int(run.data.tags["rn50.pbt_exploits"]) == 1
    lrs = [m.value for m in store.get_metric_history(run.info.run_id, "hp/optim.lr_per_256")]
    assert lrs and lrs[-1] == float(weak["optim.lr_per_256"])
    val = store.get_metric_history(run.info.run_id, "val/loss")
    assert val[-1].value < 10 and max(m.value for m in val) > 10  # wrecked, then the strong trial's lineage


def test_an_optuna_search_interrupted_and_resumed_runs_each_trial_once(tiny_data, tmp_path, server):
    path = smoke_space(tmp_path, 1, search="optuna", num_samples=2, max_concurrent_trials=1, scheduler="fifo")
    runs = tmp_path / "runs"
    tracking = ("--mlflow-uri", server.uri, "--experiment", "tune-resume")  # the real server; --resume reads it back
    args = launch_cmd("tune", "--space", path, *FAST, "--data", tiny_data, "--storage", runs, "--name", "opt", *tracking)
    status, out = watch(args, [("completed after", lambda _, driver: driver.send_signal(signal.SIGINT))])  # Ctrl-C
    assert status == 130, out[-4000:]
    assert f"trials done; continue it with: python launch.py tune --resume opt --storage {runs}" in out
    before = [r["trial"] for r in csv.DictReader((runs / "opt" / "results.csv").open()) if r["status"] == "FINISHED"]
    assert len(before) == 1, before  # the second trial was cut short by the Ctrl-C

    again = launch("tune", "--resume", "opt", *FAST, "--data", tiny_data, "--storage", runs)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    rows = list(csv.DictReader((runs / "opt" / "results.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "FINISHED" for r in rows), rows
    assert set(before) <= {r["trial"] for r in rows}
    assert not [t for t in before if f"run 'trial_{t}'" in again.stdout]  # finished trials did not train again
    assert len({r["optim.lr_per_256"] for r in rows}) == 2  # Optuna proposed two points

    from mlflow import MlflowClient

    store = MlflowClient(server.uri)
    found = store.search_runs([store.get_experiment_by_name("tune-resume").experiment_id])
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same parent, reopened and closed
    assert parents[0].data.tags["best_trial"] == rows[0]["trial"]
    assert sorted(r.info.run_name for r in found if r not in parents) == sorted(f"trial_{r['trial']}" for r in rows)


def test_a_failing_trial_is_retried_and_never_stops_the_search_on_s3(tiny_data, tmp_path, s3):
    # Two trials on an S3-protocol server (moto's), its endpoint given the environment's way (AWS_ENDPOINT_URL).
    path = smoke_space(
        tmp_path, 1, search="grid", num_samples=1, scheduler="fifo", max_trial_failures=1,
        params={"batch.per_worker": {"grid": [0, 16]}},  # 0 fails in the trial, when its config is built
    )  # fmt: skip
    args = ("tune", "--space", path, *FAST, "--data", tiny_data, "--storage", "s3://rn50/tune", "--name", "f")
    out = launch(*args, env=s3.env(with_endpoint=True), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = {r["batch.per_worker"]: r for r in csv.DictReader(io.StringIO(s3.read("tune/f/results.csv")))}
    assert rows["16"]["status"] == "FINISHED" and rows["0"]["status"] == "ERROR", rows
    failed = rows["0"]["trial"]
    assert out.stdout.count(f"Trial train_trial_{failed} errored") == 2  # the first try and one retry
    assert "1 trial(s) failed; see the table" in out.stdout
    keys = s3.keys("tune/f/")
    assert any(k.startswith(f"tune/f/trials/trial_{rows['16']['trial']}/checkpoint_") for k in keys), keys[:20]
    assert (
        f"tracking: an MLflow store cannot live on s3://rn50/tune; this run's is sqlite:///{tmp_path}/runs/mlflow.db"
        in out.stdout
    )
