"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (SQLite backend, temporary artifact root),
read back through MlflowClient, with real training runs through Ray."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
import requests
from conftest import FAST, ROOT, MlflowServer, free_port, launch, launch_cmd

pytestmark = pytest.mark.ray


def client(server):
    from mlflow import MlflowClient

    return MlflowClient(server.uri)


def the_run(server, experiment: str):
    c = client(server)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # one MLflow run per training run
    return runs[0]


def steps(server, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client(server).get_metric_history(run_id, key))


def test_a_training_run_logs_params_tags_metrics_artifacts_and_a_loadable_model(tiny_data, tmp_path, server):
    out = launch(
        "train", *FAST, "--data", tiny_data, "--storage", tmp_path, "--name", "tracked", "--epochs", "2",
        "--warmup-epochs", "0.5", "--mlflow-uri", server.uri, "--experiment", "logs-all", "--register-model", "rn50-tiny",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = the_run(server, "logs-all")
    assert (
        f"MLflow: run {run.info.run_id} at {server.uri}: {server.uri}/#/experiments/{run.info.experiment_id}/runs/" in out.stdout
    )
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert "Saving pytorch model by Pickle" not in out.stdout + out.stderr  # the model is logged as pt2
    assert client(server).get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    params = run.data.params
    assert params["optim.lr_per_256"] == "0.15" and params["batch.global_size"] == "32" and params["scale.workers"] == "2"
    tags = run.data.tags
    assert len(tags["git_commit"]) == 40 and tags["torch_version"].startswith("2.") and tags["ray_version"] == "2.60.0"
    assert tags["data_backend"] == "dali-cpu" and tags["precision"] == "fp32" and tags["world_size"] == "2"
    assert tags["device"] == "2 x cpu" and tags["rn50.starts"] == "1"
    # Per epoch: 2 points at the epochs' last steps; per log interval (every 5 steps and each epoch end).
    assert steps(server, run.info.run_id, "val/top1") == [6, 12]
    assert steps(server, run.info.run_id, "val/top5") == [6, 12]
    assert steps(server, run.info.run_id, "train/loss_step") == [5, 6, 11, 12]
    assert steps(server, run.info.run_id, "train/lr") == [5, 6, 11, 12]
    assert run.data.metrics["world_size"] == 2 and "train/img_per_s" in run.data.metrics
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)  # CPU and memory
    names = {a.path for a in client(server).list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "per_class.csv", "confusion_matrix.csv", "plots", "checkpoints"} <= names
    plots = {a.path for a in client(server).list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/loss_accuracy.png", "plots/lr_schedule.png", "plots/confusion_matrix.png"}
    per_class = (tmp_path / "tracked" / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,name,images,top1" and per_class[1].startswith("bag,Bag,5,") and len(per_class) == 11
    assert "worst classes by val top-1: " in out.stdout
    best = {a.path for a in client(server).list_artifacts(run.info.run_id, "checkpoints/best")}
    assert "checkpoints/best/state.pt" in best

    import mlflow
    import torch

    mlflow.set_tracking_uri(server.uri)
    try:
        (model_info,) = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list"
        )
        model = mlflow.pytorch.load_model(model_info.model_uri)
    finally:
        mlflow.set_tracking_uri(None)  # it also sets MLFLOW_TRACKING_URI, which later launches would inherit
    with torch.no_grad():  # a dynamic batch dimension: any batch size, not the example's
        assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10) and model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    versions = client(server).search_model_versions("name = 'rn50-tiny'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id


def test_a_tracker_outage_mid_run_loses_no_metrics(tiny_data, tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-outage"))
    server.start()
    args = ("train", *FAST, "--data", tiny_data, "--storage", tmp_path_factory.mktemp("runs"), "--name", "outage")
    args += ("--epochs", "3", "--warmup-epochs", "0.5", "--log-every", "1", "--mlflow-uri", server.uri, "--experiment", "outage")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(launch_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "epoch 1/3 step 3/6" in line:
                server.stop()  # the tracking server goes away mid-run
            if "epoch 2/3 step 5/6" in line:
                server.start()  # and comes back on the same port and store
        assert proc.wait() == 0, "".join(lines)[-4000:]
        out = "".join(lines)
        assert "tracking: MLflow unreachable" in out and "sending the buffered metrics" in out
        run = the_run(server, "outage")
        assert steps(server, run.info.run_id, "train/loss_step") == list(range(1, 19))
        assert steps(server, run.info.run_id, "val/top1") == [6, 12, 18]
    finally:
        proc.kill()
        server.stop()


def test_an_unreachable_tracker_fails_fast_unless_optional(tiny_data, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    out = launch("train", *FAST, "--data", tiny_data, "--storage", tmp_path, "--epochs", "2", "--mlflow-uri", uri)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert f"tracking.uri: MLflow at {uri} is unreachable" in last and "--tracking optional" in last
    assert not any(p.name.startswith("rn50-") for p in tmp_path.iterdir())  # no run was made


def test_ui_serves_the_embedded_store_and_goes_whole_on_sigterm(tmp_path):
    import psutil

    port = free_port()
    proc = subprocess.Popen(
        launch_cmd("ui", "--storage", tmp_path, "--port", str(port)),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        first = proc.stdout.readline()
        assert (
            first.strip() == f"MLflow UI for sqlite:///{tmp_path.resolve()}/mlflow.db at http://127.0.0.1:{port}/#/experiments"
            f"?workflowType=machine_learning (Ctrl-C stops it)"
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow ui did not answer")
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 2  # mlflow ui and its server's workers
        proc.send_signal(signal.SIGTERM)  # as a service manager or `kill` stops it
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(tree, timeout=20)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_ui_in_a_real_browser_opens_the_projects_runs_in_the_training_view(server, tmp_path):
    # MLflow 3.17's UI has a GenAI view and a model-training view. The project's experiments carry the tag the UI
    # reads where its GenAI/Model-training switch is off, and the links the project prints carry the switch's URL
    # parameter: both are checked, the link by opening it. The run is made through the project's tracking code.
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("needs chromium (apt-get install chromium; .ci/run installs it)")
    import re

    from rn50_ray.config import load_config, resolve
    from rn50_ray.tracking import open_run, ui_url

    cfg = resolve(load_config([], {"tracking.uri": server.uri, "tracking.experiment": "browser", "run.name": "seen-in-browser",
                                   "run.storage": str(tmp_path)}))  # fmt: skip
    tracked = open_run(cfg, str(tmp_path), lambda _: None, lambda *_: None)
    assert client(server).get_experiment(tracked.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=25000", "--dump-dom",
         ui_url(server.uri, tracked.experiment_id)],
        capture_output=True, text=True, timeout=180,
    ).stdout  # fmt: skip
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    assert "seen-in-browser" in text, text[-3000:]  # the runs table, rendered by the UI's JavaScript
    assert "Experiments browser Runs " in text and "Training runs" not in text and "Traces 0" not in text  # not GenAI


def test_a_report_waits_for_queued_metrics_but_never_for_an_outage(server):
    # A Tune scheduler may stop a trial right after its report (PBT's exploit, ASHA's cut): rank 0 settles the
    # sink first, so the epoch's val metrics are in MLflow before the trial can die with them queued.
    from rn50_ray.tracking.sink import MetricSink

    c = client(server)
    run_id = c.create_run(c.create_experiment(f"settle-{time.time_ns()}")).info.run_id
    sink = MetricSink(server.uri, run_id, flush_every_s=3600)  # the thread would wait an hour: settle sends
    sink.log({"val/loss": 12.5}, 6)
    assert sink.settle() == 0
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "val/loss")] == [(6, 12.5)]
    sink.close()
    away = MetricSink(f"http://127.0.0.1:{free_port()}", run_id, flush_every_s=3600)  # nothing listens there
    away.log({"val/loss": 1.0}, 7)
    assert away.settle() == 1 and away.down_since is not None  # one refused try, and training goes on
    start = time.monotonic()
    assert away.settle() == 1 and time.monotonic() - start < 1.0  # down: no more tries from a report
    away.close(timeout_s=0)
