"""Clusters end to end on this machine: the real autoscaler with Ray's fake_multinode provider, and the
Jobs API against a `ray start --head` cluster. Both run the real `ray` CLI from this virtual environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import FAST, ROOT, free_port, launch

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent  # the ray CLI beside this python


@pytest.fixture
def ray_cli_env(monkeypatch):
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # nodes' workers import this checkout
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield dict(os.environ)
    subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)


def test_the_autoscaler_adds_nodes_for_a_training_job_and_removes_them_when_idle(ray_cli_env, tiny_data, tmp_path):
    from ray.cluster_utils import AutoscalingCluster

    class ProjectAutoscalingCluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            config = yaml.safe_load((ROOT / "tests" / "data" / "fake_multinode.yaml").read_text())
            head = {"resources": head_resources, "node_config": {}, "max_workers": 0}
            config["available_node_types"] = {**worker_node_types, "ray.head.default": head}
            config.update(config_kwargs)
            return config

    cluster = ProjectAutoscalingCluster(
        head_resources={"CPU": 0},
        worker_node_types={
            "cpu_worker": {"resources": {"CPU": 1, "slot": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}
        },
    )
    cluster.start()
    import ray

    try:
        ray.init(address="auto")
        assert len([n for n in ray.nodes() if n["Alive"]]) == 1  # the head alone: no worker nodes yet
        out = launch(
            "train", *FAST, "--data", tiny_data, "--storage", tmp_path, "--name", "autoscaled", "--epochs", "1",
            "--warmup-epochs", "0.5", "--address", "auto", "--workers", "2", "--worker-resources", "slot=1",
            "--no-resource-check",
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "summary: 1 epochs" in out.stdout and "2 workers x 16 images" in out.stdout
        head = ray.get_runtime_context().get_node_id()
        workers_seen = {n["NodeID"] for n in ray.nodes() if n["NodeID"] != head}  # alive or already gone
        assert len(workers_seen) == 2  # the autoscaler launched two worker nodes for the job
        assert "node(s) of type cpu_worker" in out.stdout + out.stderr  # the autoscaler's own event lines
        deadline = time.time() + 180
        while len([n for n in ray.nodes() if n["Alive"]]) > 1:  # idle_timeout_minutes 0.1
            assert time.time() < deadline, "idle worker nodes were never removed"
            time.sleep(2)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_job_submit_trains_and_logs_to_mlflow(ray_cli_env, tiny_data, tmp_path, server):
    dashboard = free_port()
    start = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true",
    ]  # fmt: skip
    subprocess.run(start, check=True, capture_output=True, timeout=180)
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT), "--",
        "python", "launch.py", "train", *FAST, "--data", str(tiny_data), "--storage", str(tmp_path), "--name", "job",
        "--epochs", "1", "--warmup-epochs", "0.5", "--mlflow-uri", server.uri, "--experiment", "jobs",
    ]  # fmt: skip
    out = subprocess.run(submit, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "succeeded" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    assert "summary: 1 epochs" in out.stdout  # the job's log, streamed back

    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("jobs").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "job"
