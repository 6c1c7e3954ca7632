"""The cluster's MLflow server with authentication on (rn50_ray/tracking/server.py, credentials.py), against a real
`mlflow server --app-name basic-auth` on 127.0.0.1: refused without credentials, a run with them logs its params
and metrics and never the password, wrong ones stop the command in one line before Ray starts, and the password
rotates."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import requests
from conftest import FAST, ROOT, free_port, launch

SEARCH = "/api/2.0/mlflow/experiments/search"


def _server(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rn50_ray.tracking.server", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    port = free_port()
    files = {"store": root / "store", "credentials": root / "home" / ".rn50" / "mlflow-credentials.json",
             "log": root / "mlflow.log", "pid": root / "mlflow.pid"}  # fmt: skip
    out = _server("start", "--host", "127.0.0.1", "--port", str(port), "--store", str(files["store"]), "--log",
                  str(files["log"]), "--pid-file", str(files["pid"]), "--credentials", str(files["credentials"]))  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr + files["log"].read_text()[-3000:]
    assert f"authentication on, credentials in {files['credentials']}" in out.stdout
    yield {"uri": f"http://127.0.0.1:{port}", **files}
    _server("stop", "--pid-file", str(files["pid"]))


def _secret(server) -> dict:
    return json.loads(server["credentials"].read_text())


def test_requests_without_credentials_are_refused_and_the_password_stays_owner_only(auth_server):
    uri, known = auth_server["uri"], _secret(auth_server)
    assert requests.get(uri + SEARCH, params={"max_results": 1}, timeout=10).status_code == 401
    assert requests.get(uri + SEARCH, params={"max_results": 1}, auth=("admin", "guess"), timeout=10).status_code == 401
    assert requests.get(uri + SEARCH, params={"max_results": 1}, auth=(known["username"], known["password"]), timeout=10).ok
    assert len(known["password"]) >= 24 and known["uri"] == uri  # generated at the first start, for this server
    for file in (
        auth_server["credentials"],
        auth_server["store"] / ".rn50-mlflow-secrets.json",
        auth_server["store"] / "auth.ini",
    ):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    assert stat.S_IMODE(auth_server["credentials"].parent.stat().st_mode) == 0o700
    assert known["password"] not in auth_server["log"].read_text()  # never in a log
    shown = _server("credentials", "--credentials", str(auth_server["credentials"]))
    assert (
        shown.stdout.strip()
        == f"export MLFLOW_TRACKING_USERNAME={known['username']} MLFLOW_TRACKING_PASSWORD={known['password']}"
    )


def test_wrong_or_missing_credentials_stop_the_command_in_one_line_before_ray_starts(auth_server, tiny_data, tmp_path):
    uri = auth_server["uri"]
    args = ["train", *FAST, "--data", tiny_data, "--storage", tmp_path, "--mlflow-uri", uri, "--epochs", "1"]
    nowhere = {"RN50_MLFLOW_CREDENTIALS": str(tmp_path / "none.json")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    wrong = launch(*args, env={**env, **nowhere, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "guess"})
    missing = launch(*args, env={**env, **nowhere}, timeout=300)
    for out, who in ((wrong, "the credentials of 'admin'"), (missing, "a request without credentials")):
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1] == (
            f"error: tracking.uri: MLflow at {uri} refused {who} (HTTP 401 Unauthorized); set MLFLOW_TRACKING_USERNAME "
            f"and MLFLOW_TRACKING_PASSWORD, or get the cluster's with `eval \"$(ssh HEAD python -m "
            f'rn50_ray.tracking.server credentials --export)"`'
        )
        assert "Traceback" not in out.stderr and "Started a local Ray instance" not in out.stdout + out.stderr
    # --tracking optional trains without an unreachable server, never without a refusing one
    optional = launch(*args, "--tracking", "optional", env={**env, **nowhere}, timeout=300)
    assert optional.returncode == 2 and "refused a request without credentials" in optional.stderr


@pytest.mark.ray
def test_a_run_with_the_heads_credentials_logs_its_params_and_metrics_and_never_the_password(auth_server, tiny_data, tmp_path):
    uri, known = auth_server["uri"], _secret(auth_server)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["RN50_MLFLOW_CREDENTIALS"] = str(auth_server["credentials"])  # as on the head: the file start wrote
    out = launch("train", *FAST, "--data", tiny_data, "--storage", tmp_path / "runs", "--name", "authed", "--mlflow-uri",
                 uri, "--epochs", "1", "--warmup-epochs", "0.2", env=env)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from mlflow import MlflowClient

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = known["username"], known["password"]
    try:
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("rn50-ray").experiment_id], "run_name = 'authed'")
        assert run.data.params["optim.lr_per_256"] == "0.15" and "val/top1" in run.data.metrics
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_step")]  # the sink's, authenticated
        values = [*run.data.params.values(), *run.data.tags.values()]
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    assert not [v for v in values if known["password"] in v]
    leaked = [p for p in (tmp_path / "runs").rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".jsonl")
              and known["password"] in p.read_text()]  # fmt: skip
    assert not leaked and known["password"] not in out.stdout + out.stderr


def test_rotating_the_password_keeps_the_server_and_retires_the_old_one(auth_server):
    uri, old = auth_server["uri"], _secret(auth_server)
    out = _server("rotate-password", "--store", str(auth_server["store"]), "--credentials", str(auth_server["credentials"]))
    assert out.returncode == 0, out.stderr
    new = _secret(auth_server)
    assert new["password"] != old["password"] and stat.S_IMODE(auth_server["credentials"].stat().st_mode) == 0o600
    get = lambda who: requests.get(uri + SEARCH, params={"max_results": 1}, auth=(who["username"], who["password"]), timeout=10)
    assert get(old).status_code == 401 and get(new).ok
    stored = json.loads((auth_server["store"] / ".rn50-mlflow-secrets.json").read_text())
    assert stored["password"] == new["password"]  # a restart over the same store keeps the new one
