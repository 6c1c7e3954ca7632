"""`ray up`, `ray submit`, `ray job submit` and `ray down` as an operator runs them, against cluster/dgx.yaml, on a
real SSH "cluster" of one machine: sshd on 127.0.0.1, a dedicated local user (so the config's own `ray stop`
touches no other Ray), and the real `ray` launcher on the client side.

The cluster YAML is derived from cluster/dgx.yaml by a small transform (`derived_config`) and nothing else: it
drops `docker` (no Docker engine here), puts the head at 127.0.0.1 with no worker IPs, and points the paths at
the test user's home (its account, its key, its shared-storage folder). The user's shell finds a virtual
environment layered over this checkout's (.venv's packages plus its own editable install of the project).
"""

from __future__ import annotations

import getpass
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from conftest import ROOT

pytestmark = pytest.mark.ray

USER = "rn50ssh"
BIN = Path(sys.executable).parent


def _sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def _as_user(command: str, **kw) -> subprocess.CompletedProcess:
    return _sh("su", "-", USER, "-c", command, **kw)


def derived_config(home: Path, key: Path) -> dict:
    """cluster/dgx.yaml as this machine can run it: no docker, the head at 127.0.0.1, the test user's paths."""
    text = (ROOT / "cluster" / "dgx.yaml").read_text()
    text = text.replace("/home/mluser", str(home)).replace("HEAD_IP", "127.0.0.1").replace("/nfs/rn50", f"{home}/nfs")
    config = yaml.safe_load(text)
    config.pop("docker")
    config["provider"]["worker_ips"] = []
    config["min_workers"] = config["max_workers"] = 0
    config["auth"] = {"ssh_user": USER, "ssh_private_key": str(key)}
    return config


def _user_processes() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["username", "cmdline"]):
        if p.info["username"] == USER and "sshd" not in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


@pytest.fixture(scope="module")
def ssh_cluster(tmp_path_factory, tiny_data):
    missing = [tool for tool in ("sshd", "rsync", "useradd") if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install openssh-server rsync; .ci/run installs them)")
    if getpass.getuser() != "root":
        pytest.skip("needs root: it adds a local user and starts sshd on 127.0.0.1:22")
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 22)) == 0:
            pytest.skip("port 22 is taken: an sshd already runs here")
    tmp = tmp_path_factory.mktemp("ssh")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        _sh("useradd", "--create-home", "--shell", "/bin/bash", USER)
    _sh("usermod", "--password", "*", USER)  # no password, but not locked: sshd (without PAM) refuses locked accounts
    home = Path(pwd.getpwnam(USER).pw_dir)
    for left in ("rn50-ray", "nfs"):  # a fresh node: no checkout or runs from an earlier session of this test
        shutil.rmtree(home / left, ignore_errors=True)
    # Its key, its virtual environment (this checkout's packages plus its own editable install of the project),
    # the sample data, and PATH.
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "key"))
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key"))
    (home / ".ssh").mkdir(exist_ok=True)
    shutil.copy(tmp / "key.pub", home / ".ssh" / "authorized_keys")
    venv = home / "venv"
    # This interpreter may live where another user cannot reach it (pyenv under /root): the system's Python of
    # the same version runs the same packages.
    system_python = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/usr/local/bin")
    if system_python is None:
        pytest.skip(f"needs a system-wide python{sys.version_info.major}.{sys.version_info.minor} for the test user")
    if not venv.exists():
        _sh(system_python, "-m", "venv", "--without-pip", str(venv))
        site = next(venv.glob("lib/python*/site-packages"))
        (site / "checkout_venv.pth").write_text(next(BIN.parent.glob("lib/python*/site-packages")).as_posix() + "\n")
        for script in ("ray", "mlflow", "pip"):  # console scripts that run on this venv's interpreter
            lines = (BIN / script).read_text().splitlines()
            (venv / "bin" / script).write_text("\n".join([f"#!{venv}/bin/python", *lines[1:]]) + "\n")
            (venv / "bin" / script).chmod(0o755)
    shutil.copytree(tiny_data, home / "data", dirs_exist_ok=True)
    (home / ".bashrc").write_text(f"export PATH={venv}/bin:$PATH\n")
    _sh("chown", "-R", f"{USER}:{USER}", str(home))
    (home / ".ssh").chmod(0o700)
    if _as_user(f"{venv}/bin/python -c 'import ray, mlflow, torch'", check=False).returncode:
        pytest.skip(f"{BIN.parent} (this checkout's venv) is not readable by another local user")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    sshd = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-p", "22", "-o", "ListenAddress=127.0.0.1", "-h", str(tmp / "host_key"),
         "-o", "UsePAM=no", "-o", "StrictModes=no", "-o", f"PidFile={tmp / 'sshd.pid'}"],
        stderr=open(tmp / "sshd.log", "w"),
    )  # fmt: skip
    deadline = time.time() + 30
    while socket.socket().connect_ex(("127.0.0.1", 22)) and time.time() < deadline:
        assert sshd.poll() is None, (tmp / "sshd.log").read_text()
        time.sleep(0.2)
    # The client: its own HOME, holding the cluster token (as `ray get-auth-token --generate` writes it).
    client_home = tmp / "client"
    (client_home / ".ray").mkdir(parents=True)
    env = {**os.environ, "HOME": str(client_home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    _sh(str(BIN / "ray"), "get-auth-token", "--generate", env=env)
    config = tmp / "dgx-local.yaml"
    derived = derived_config(home, tmp / "key")
    config.write_text(yaml.safe_dump(derived))
    # Here the client and the head share /tmp/ray, where the local provider keeps its cluster state and lock:
    # the head's autoscaler (the test user) must open the files the client (root) creates.
    for suffix in ("lock", "state"):
        shared = Path("/tmp/ray") / f"cluster-{derived['cluster_name']}.{suffix}"
        shared.parent.mkdir(mode=0o777, exist_ok=True)
        if not shared.exists():
            shared.write_text("{}" if suffix == "state" else "")  # an empty state: Ray's own start
        shared.chmod(0o666)  # Ray rewrites the state in place, so the mode stays
    try:
        yield {"config": config, "env": env, "home": home, "tmp": tmp}
    finally:
        _sh(str(BIN / "ray"), "down", "-y", str(config), check=False, env=env, cwd=ROOT, timeout=300)
        sshd.terminate()
        sshd.wait()
        for p in _user_processes():
            p.kill()


def _ray(cluster, *args: str, timeout: float = 300, check: bool = True, **env) -> subprocess.CompletedProcess:
    return _sh(str(BIN / "ray"), *args, env={**cluster["env"], **env}, cwd=ROOT, timeout=timeout, check=check)


def _mlflow_run(home: Path, name: str) -> dict:
    """The run's status and tags, read with the credentials the head's server start wrote for its user."""
    from mlflow import MlflowClient

    known = json.loads((home / ".rn50" / "mlflow-credentials.json").read_text())
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = known["username"], known["password"]
    try:
        client = MlflowClient("http://127.0.0.1:5000")
        experiment = client.get_experiment_by_name("rn50-ray").experiment_id
        (run,) = client.search_runs([experiment], f"attributes.run_name = '{name}'")
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    return {"status": run.info.status, **run.data.tags}


def test_ray_up_submit_job_submit_and_down_as_the_readme_says(ssh_cluster):
    try:
        _operate(ssh_cluster)
    except BaseException:
        print("sshd.log, last lines:\n" + (ssh_cluster["tmp"] / "sshd.log").read_text()[-2000:])  # shown on failure
        raise


def _operate(ssh_cluster) -> None:
    config, home = str(ssh_cluster["config"]), ssh_cluster["home"]
    marker = ROOT / "mlruns" / "rn50-ssh-test-marker"  # an ignored folder: it must not travel to the nodes
    marker.parent.mkdir(exist_ok=True)
    marker.write_text("ignored")
    try:
        _ray(ssh_cluster, "up", "-y", config)
    finally:
        marker.unlink()
    assert (home / "rn50-ray" / "launch.py").is_file()
    assert not (home / "rn50-ray" / ".venv").exists() and not (home / "rn50-ray" / "mlruns").exists()  # rsync_filter
    status = _ray(ssh_cluster, "exec", config, "ray status")  # token auth in every shell the launcher opens
    assert "Node status" in status.stdout, status.stdout[-2000:] + status.stderr[-2000:]
    assert requests.get("http://127.0.0.1:5000/health", timeout=5).ok  # the head's tracking server
    # ... with authentication on: refused without credentials; the password made at `ray up`, owner-only on the head
    search = "http://127.0.0.1:5000/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=10).status_code == 401
    credentials = home / ".rn50" / "mlflow-credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600 and credentials.stat().st_uid == pwd.getpwnam(USER).pw_uid
    password = json.loads(credentials.read_text())["password"]
    assert password not in Path(config).read_text()
    exported = _ray(ssh_cluster, "exec", config, "python -m rn50_ray.tracking.server credentials --export")
    assert f"MLFLOW_TRACKING_PASSWORD={password}" in exported.stdout  # the README's one command for a client
    # The operator's training run, as README's cluster section shows it.
    train = ("train", "--recipe", "cpu_demo", "--data", f"{home}/data", "--epochs", "1", "--warmup-epochs", "0.5",
             "--workers", "2", "--storage", f"{home}/nfs/runs", "--mlflow-uri", "http://127.0.0.1:5000")  # fmt: skip
    submitted = _ray(ssh_cluster, "submit", config, "launch.py", "--", *train, "--name", "submitted")
    assert "summary: 1 epochs" in submitted.stdout, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert _mlflow_run(home, "submitted")["status"] == "FINISHED"
    assert password not in submitted.stdout + submitted.stderr
    # A client with the README's exports submits a job; the commit it records comes from the client.
    commit = _sh("git", "rev-parse", "HEAD", cwd=ROOT).stdout.strip()
    job = _ray(
        ssh_cluster, "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".",
        "--runtime-env-json", json.dumps({"env_vars": {"RN50_GIT_COMMIT": commit}}), "--",
        "python", "launch.py", *train, "--name", "job", RAY_AUTH_MODE="token",
    )  # fmt: skip
    assert "succeeded" in job.stdout and "summary: 1 epochs" in job.stdout, job.stdout[-3000:]
    tags = _mlflow_run(home, "job")
    assert tags["status"] == "FINISHED" and tags["git_commit"] == commit
    refused = _ray(ssh_cluster, "job", "list", "--address", "http://127.0.0.1:8265", check=False, RAY_AUTH_MODE="disabled")
    assert refused.returncode != 0  # without the token mode a client is turned away
    # ray down leaves nothing of the cluster running: no Ray, no MLflow server.
    _ray(ssh_cluster, "down", "-y", config)
    deadline = time.time() + 30
    while _user_processes() and time.time() < deadline:
        time.sleep(1)
    assert not _user_processes(), [" ".join(p.cmdline()) for p in _user_processes()]
    # And the next ray up starts a cluster, and its MLflow server, again.
    _ray(ssh_cluster, "up", "-y", config)
    assert requests.get("http://127.0.0.1:5000/health", timeout=5).ok
    assert "Node status" in _ray(ssh_cluster, "exec", config, "ray status").stdout
