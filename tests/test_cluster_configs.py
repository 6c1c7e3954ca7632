"""Every cluster config passes Ray's own validator, and the KubeRay manifests have the fields that matter."""

import copy
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = sorted(CLUSTER.glob("*.yaml"))


def _validate(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))  # the launcher fills provider defaults first, as `ray up` does
    validate_config(cfg)
    return cfg


def test_the_expected_configs_exist():
    assert {p.name for p in LAUNCHER_CONFIGS} == {"dgx.yaml", "aws-p4d.yaml", "aws-p5.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_cluster_launcher_configs_pass_rays_validator(path: Path):
    raw = yaml.safe_load(path.read_text())
    cfg = _validate(raw)
    docker = cfg["docker"]
    assert docker["image"].startswith("nvcr.io/nvidia/pytorch:")
    assert {"--gpus all", "--ipc=host"} <= set(docker["run_options"])
    assert any(o.startswith("--shm-size") for o in docker["run_options"])
    mounts = cfg["file_mounts"]
    assert "." in mounts.values()  # the project goes to every node
    assert any("pip install" in c and "-e" in c for c in cfg["setup_commands"])  # installed: launch.py finds it
    assert "-e RAY_AUTH_MODE=token" in docker["run_options"] and "~/.ray/auth_token" in mounts.values()
    assert any("export RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in cfg["setup_commands"])  # every shell
    assert cfg["rsync_filter"] == [".gitignore"]  # no .venv, runs/ or mlruns/ to every node
    head = " ".join(cfg["head_start_ray_commands"])
    assert "rn50_ray.tracking.server start --host" in head and "0.0.0.0 --port 5000" not in head  # a private address
    assert ":6379" in head.split("rn50_ray.tracking.server", 1)[1]  # the server ends with the Ray head
    assert "--no-auth" not in head and "PASSWORD" not in path.read_text()  # authentication on; no password in a YAML
    for command in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "ulimit -n 65536" not in command  # never above the hard limit: the start prints no error


def test_dgx_starts_every_fixed_machine():
    raw = yaml.safe_load((CLUSTER / "dgx.yaml").read_text())
    assert raw["min_workers"] == raw["max_workers"] == len(raw["provider"]["worker_ips"]) == 3  # nothing on demand
    node = _validate(raw)["available_node_types"]["local.cluster.node"]  # the launcher's one node type for them
    assert node["min_workers"] == node["max_workers"] == 3


def test_aws_configs_autoscale_gpu_workers_from_zero():
    for name, node_type, instance in (("aws-p4d.yaml", "gpu_p4d", "p4d.24xlarge"), ("aws-p5.yaml", "gpu_p5", "p5.48xlarge")):
        cfg = _validate(yaml.safe_load((CLUSTER / name).read_text()))
        gpu = cfg["available_node_types"][node_type]
        assert gpu["node_config"]["InstanceType"] == instance
        assert gpu["min_workers"] == 0 and gpu["max_workers"] == 8 and cfg["idle_timeout_minutes"] > 0
        assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_a_broken_edit_fails_validation():
    raw = yaml.safe_load((CLUSTER / "aws-p4d.yaml").read_text())
    raw["docker"]["gpus"] = "all"  # not a docker key the launcher knows
    with pytest.raises(Exception, match="Additional properties are not allowed"):
        _validate(raw)
    raw = yaml.safe_load((CLUSTER / "aws-p4d.yaml").read_text())
    raw["head_node_type"] = "missing"
    with pytest.raises(Exception, match=r"head_node_type. must be one of .available_node_types"):
        _validate(raw)


def test_kuberay_manifests_have_autoscaling_gpu_workers_and_the_train_entrypoint():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        (gpu,) = spec["workerGroupSpecs"]
        assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] == 8
        (container,) = gpu["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        for c in (container, head):  # token auth in every container, the token from a Secret
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token" and env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
        # MLflow with authentication on: started on the head, its admin password from a Secret, never a literal
        env = {e["name"]: e for e in head["env"]}
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-admin", "key": "password"}
        start = " ".join(head["lifecycle"]["postStart"]["exec"]["command"])
        assert "rn50_ray.tracking.server start" in start and "--no-auth" not in start and "--watch 127.0.0.1:6379" in start
    assert job["spec"]["entrypoint"].startswith("python launch.py train ") and "--workers 8:64" in job["spec"]["entrypoint"]
    assert "--mlflow-uri http://127.0.0.1:5000" in job["spec"]["entrypoint"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_launch_py_alone_in_another_folder_runs_the_installed_package(tmp_path):
    # What `ray submit` does: copy launch.py to the head's home folder and run it there.
    import subprocess
    import sys

    site = tmp_path / "site"
    install = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(site),
        str(ROOT),
    ]
    assert subprocess.run(install, capture_output=True, text=True, timeout=300).returncode == 0
    home = tmp_path / "home"
    home.mkdir()
    (home / "launch.py").write_text((ROOT / "launch.py").read_text())
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "launch.py", "train", "--help"], cwd=home, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "--workers SCALE.WORKERS" in out.stdout and "--mlflow-uri" in out.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import rn50_ray; print(rn50_ray.__file__)"], cwd=home, env=env, capture_output=True, text=True
    )
    assert where.stdout.startswith(str(site))
