"""Shared fixtures: real Fashion-MNIST JPEG folders and a runner for launch.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rn50_ray.data.sample import DEFAULT_SOURCE, prepare_sample  # noqa: E402


def _need_fashion_mnist() -> None:
    if not Path(DEFAULT_SOURCE).is_dir():
        pytest.fail(f"{DEFAULT_SOURCE} missing: apt-get install -y dataset-fashion-mnist (.ci/run installs it)")


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """100 train and 20 val 32 px JPEGs per class (1,000 / 200 images)."""
    _need_fashion_mnist()
    return prepare_sample(tmp_path_factory.mktemp("data") / "sample", train_per_class=100, val_per_class=20, size=32)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """20 train and 5 val images per class: fast runs that only need to go through the motions."""
    _need_fashion_mnist()
    return prepare_sample(tmp_path_factory.mktemp("data") / "tiny", train_per_class=20, val_per_class=5, size=32)


def bench_table(out: str, what: str) -> list[dict[str, str]]:
    """The rows of a table printed by `bench` (rn50_ray.bench.print_table) on the CPU at 32 px, by column
    name; fails on any line that does not fit the columns."""
    from rn50_ray.bench import COLUMNS

    lines = out.strip().splitlines()
    assert re.fullmatch(rf"bench {what} on cpu, 32 px", lines[0]), out
    header = [c.strip() for c in lines[1].split("|")]
    assert header == list(COLUMNS[what]), out
    rows = []
    for line in lines[2:]:
        if " | " not in line:  # the ratios and batch-search lines follow the rows
            break
        cells = [c.strip() for c in line.split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


@pytest.fixture
def host_reads(monkeypatch) -> list[str]:
    """From now on, the name of every device -> host read of a tensor (on a GPU, each is a sync)."""
    import torch

    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.fixture
def copy_of(tmp_path):
    def _copy(src: Path) -> Path:
        dst = tmp_path / "data"
        # Not the source's manifest: it names the source folder, and whether one is there depends on which test ran first.
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".rn50-manifest*"))
        return dst

    return _copy


def launch_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch.py"), *map(str, args)]


def launch(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(launch_cmd(*args), cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def watch(
    cmd: list[str],
    actions: list[tuple[str, Callable[[str, subprocess.Popen], None]]],
    timeout: float = 600,
    env: dict | None = None,
) -> tuple[int, str]:
    """Run the driver; when a line holds the next marker, run its action (line, driver process). Returns (status, output)."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        while actions and actions[0][0] in line:
            actions.pop(0)[1](line, proc)
        if time.time() > deadline:
            proc.kill()
            break
    status = proc.wait()
    assert not actions, f"never saw {actions[0][0]!r}:\n{''.join(lines)[-4000:]}"
    return status, "".join(lines)


@dataclass
class Listed:
    """A split as tests read it: classes, and (absolute path, label) per image in the manifest's order."""

    classes: tuple[str, ...]
    samples: list[tuple[str, int]]
    duplicates: int = 0
    ignored: int = 0

    def __len__(self) -> int:
        return len(self.samples)


def listed(root) -> tuple[Listed, Listed]:
    """The train and val splits of a data folder, from its manifest (built beside it on first use)."""
    from rn50_ray.data.manifest import open_dataset

    dataset = open_dataset(str(root), str(root), log=lambda line: None)
    return tuple(  # type: ignore[return-value]
        Listed(s.classes, [(s.file(i), int(s.labels[i])) for i in range(len(s))], s.duplicates, s.ignored)
        for s in (dataset.train, dataset.val)
    )


def run_config(data, backend: str = "pytorch", *, world: int = 1, global_batch: int = 20, per_worker: int = 20, size: int = 32,
               seed: int = 0, skip: bool = False, val_batch: int = 0, loader_workers: int | None = None, **extra):  # fmt: skip
    """A resolved config for `world` workers on the folder `data` (its manifest is built beside it on first use)."""
    from rn50_ray.config import load_config, resolve

    workers = loader_workers if loader_workers is not None else (0 if backend == "pytorch" else 1)
    overrides = {
        "data.path": str(data), "data.backend": backend, "data.image_size": size, "data.loader_workers": workers,
        "data.skip_bad_images": skip, "data.val_batch": val_batch, "batch.global_size": global_batch,
        "batch.per_worker": per_worker, "system.seed": seed, "scale.workers": str(world), **extra,
    }  # fmt: skip
    return resolve(load_config([], overrides))


def loaders_for(data, backend: str = "pytorch", *, rank: int = 0, world: int = 1, channels_last: bool = False,
                fp16_input: bool = False, **options):  # fmt: skip
    """Rank `rank` of `world`'s loaders over the folder `data`, as a worker makes them (run_config's options)."""
    import torch

    from rn50_ray.data.loaders import open_loaders
    from rn50_ray.data.types import Shard

    cfg = run_config(data, backend, world=world, **options)
    shard = Shard(rank, world, torch.device("cpu"))
    return open_loaders(cfg, shard, channels_last=channels_last, fp16_input=fp16_input, log=lambda line: None)[1]


# Overrides for short CPU runs on the 32 px samples (the cpu_demo recipe does the rest).
FAST = ("--recipe", "cpu_demo", "--log-every", "5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(self.uri + "/health", timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, temporary artifact root) for the session."""
    s = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    s.start()
    yield s
    s.stop()


class S3Server:
    """moto's S3 server on 127.0.0.1: a real S3 protocol peer for --storage s3://, with the bucket `rn50`."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        log = open(root / "moto.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                requests.get(self.endpoint, timeout=2)
                break
            except requests.RequestException:
                time.sleep(0.3)
        self._client().create_bucket(Bucket="rn50")

    def _client(self):
        import boto3

        credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
        return boto3.client("s3", endpoint_url=self.endpoint, **credentials)

    def uri(self, path: str) -> str:
        """The URI form: the endpoint in pyarrow's query parameters."""
        return f"s3://rn50/{path}?endpoint_override=127.0.0.1:{self.port}&scheme=http&region=us-east-1"

    CREDENTIALS = (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1"))

    def env(self, with_endpoint: bool = False) -> dict[str, str]:
        """Credentials for every process; with `with_endpoint`, the environment form of the endpoint too."""
        return {**os.environ, **dict(self.CREDENTIALS), **({"AWS_ENDPOINT_URL": self.endpoint} if with_endpoint else {})}

    def keys(self, prefix: str) -> list[str]:
        listed = self._client().list_objects_v2(Bucket="rn50", Prefix=prefix)
        return [o["Key"] for o in listed.get("Contents", [])]

    def read(self, key: str) -> str:
        return self._client().get_object(Bucket="rn50", Key=key)["Body"].read().decode()

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    s = S3Server(tmp_path_factory.mktemp("s3"))
    yield s
    s.stop()
