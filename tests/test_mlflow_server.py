"""The cluster's MLflow server under its supervisor (rn50_ray/tracking/server.py): a new start replaces the old
server instead of colliding with it, host names are allowed, and the server goes when Ray's GCS port closes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest
import requests
from conftest import ROOT, free_port


def _start(tmp_path, port: int, gcs: int) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "rn50_ray.tracking.server", "start", "--host", "127.0.0.1", "--port", str(port),
        "--store", str(tmp_path / "store"), "--watch", f"127.0.0.1:{gcs}", "--log", str(tmp_path / "mlflow.log"),
        "--pid-file", str(tmp_path / "mlflow.pid"), "--credentials", str(tmp_path / "credentials.json"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _group(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


@pytest.mark.slow  # two MLflow server starts: about 45 s
def test_a_restart_replaces_the_server_and_it_ends_with_ray(tmp_path):
    gcs = socket.create_server(("127.0.0.1", 0))  # stands in for Ray's GCS port on the head
    port = free_port()
    first = _start(tmp_path, port, gcs.getsockname()[1])
    assert first.returncode == 0, first.stderr
    old = int((tmp_path / "mlflow.pid").read_text())
    assert len(_group(old)) >= 2  # the supervisor and the server (and its workers)
    second = _start(tmp_path, port, gcs.getsockname()[1])  # a second `ray up`: no "Address already in use"
    assert second.returncode == 0 and "stopped the MLflow server a previous start left running" in second.stdout, second.stderr
    new = int((tmp_path / "mlflow.pid").read_text())
    assert new != old and not _group(old)
    assert (tmp_path / "mlflow.log").read_text().count("Uvicorn running on") == 2  # appended, not truncated
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
    known = json.loads((tmp_path / "credentials.json").read_text())  # the restart kept the first start's password
    auth = (known["username"], known["password"])
    for host in (f"{socket.gethostname()}:{port}", f"localhost:{port}", f"10.1.2.3:{port}"):
        assert requests.get(url, headers={"Host": host}, auth=auth, timeout=10).status_code == 200, host  # MLflow 3 checks it
    assert requests.get(url, headers={"Host": f"evil.example:{port}"}, auth=auth, timeout=10).status_code == 403
    gcs.close()  # ray stop, ray down
    deadline = time.time() + 30
    while _group(new) and time.time() < deadline:
        time.sleep(0.5)
    assert not _group(new), [p.cmdline() for p in _group(new)]
