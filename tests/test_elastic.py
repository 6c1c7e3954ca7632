"""Elastic and fault-tolerant training on a real multi-node Ray cluster on this machine.

`ray.cluster_utils.Cluster` starts a head and worker nodes (separate raylets); each worker node has
one CPU and one `slot` resource, and every Ray Train worker asks for a slot, so workers land on
distinct nodes. Training runs on the CPU: no fake GPUs are needed. The driver is `launch.py train
--address ...` in a subprocess; the test adds, drains and removes nodes while it reads the log.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
from conftest import FAST, ROOT, launch_cmd, watch

pytestmark = pytest.mark.ray

FAST_RAY = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",  # a start planned on a stale view of a lost node
}


@pytest.fixture
def cluster(monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # worker processes import this checkout
    for k, v in FAST_RAY.items():
        monkeypatch.setenv(k, v)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * 2**20})
    yield c
    c.shutdown()


def add_worker_node(c):
    return c.add_node(num_cpus=1, resources={"slot": 1}, object_store_memory=100 * 2**20)


def train_args(data: Path, storage: Path, cluster, *extra: str) -> list[str]:
    return launch_cmd(
        "train", *FAST, "--data", data, "--storage", storage, "--name", "elastic", "--address", cluster.address,
        "--worker-resources", "slot=1", "--log-every", "1", "--max-failures", "3", *extra,
    )  # fmt: skip


def _history(storage: Path) -> list[dict]:
    return [json.loads(x) for x in (storage / "elastic" / "metrics.jsonl").read_text().splitlines()]


def test_node_drained_then_lost_shrinks_and_finishes(tiny_data, tmp_path, cluster):
    add_worker_node(cluster)
    doomed = add_worker_node(cluster)

    def drain(*_):  # the notice a cloud gives before it reclaims a spot node
        import ray
        from ray.core.generated import autoscaler_pb2

        gcs = ray._raylet.GcsClient(address=cluster.address)
        reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
        accepted, _ = gcs.drain_node(doomed.node_id, reason, "spot reclaim", int(time.time() * 1000) + 120_000)
        assert accepted

    def lose_node_once_saved(line, _):  # the node goes at its deadline, after the checkpoint is stored
        step = int(line.split("checkpointing at step ")[1].split()[0])
        snapshot = tmp_path / "elastic" / "checkpoint_manager_snapshot.json"
        deadline = time.time() + 60
        while f"_step{step:08d}" not in (snapshot.read_text() if snapshot.exists() else ""):
            assert time.time() < deadline, "the preemption checkpoint was never registered"
            time.sleep(0.2)
        cluster.remove_node(doomed, allow_graceful=False)

    args = train_args(tiny_data, tmp_path, cluster, "--workers", "1:2", "--epochs", "4", "--warmup-epochs", "0.5")
    status, out = watch(
        args,
        [
            ("epoch 2/4 step 2/6", drain),
            ("checkpointing at step", lose_node_once_saved),
        ],
    )
    assert status == 0, out[-4000:]
    assert "draining in 1" in out  # about 120 s left: time enough to checkpoint
    history = _history(tmp_path)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and history[-1]["step"] == 24
    assert history[0]["world_size"] == 2 and history[-1]["world_size"] == 1
    assert "resize: world size 2 -> 1" in out
    assert "global batch 32 = 1 workers x 32 images (micro-batch 16, 2 accumulation)" in out  # the recipe did not change
    saved_at = int(out.split("checkpointing at step ")[1].split()[0])
    assert f"step {saved_at} (" in out.split("resize: world size 2 -> 1")[0]  # resumed from the preemption checkpoint
    assert "resizes 1" in out


def test_node_gain_grows_the_run_to_max(tiny_data, tmp_path, cluster):
    add_worker_node(cluster)
    args = train_args(
        tiny_data, tmp_path, cluster, "--workers", "1:2", "--epochs", "4", "--warmup-epochs", "0.5",
        "--resize-interval", "1", "--checkpoint-every-steps", "2",
    )  # fmt: skip
    status, out = watch(args, [("epoch 1/4 step 2/6", lambda *_: add_worker_node(cluster))])
    assert status == 0, out[-4000:]
    history = _history(tmp_path)
    assert history[0]["world_size"] == 1 and history[-1]["world_size"] == 2
    assert (
        "resize: world size 1 -> 2" in out and "global batch 32 = 2 workers x 16 images (micro-batch 16, 1 accumulation)" in out
    )
    assert history[-1]["step"] == 24


def test_worker_crash_restarts_from_the_last_checkpoint(tiny_data, tmp_path):
    def kill_a_worker(_, driver):  # a Ray Train worker started by this run (after its driver), not a leftover
        started = psutil.Process(driver.pid).create_time()
        workers = [
            p
            for p in psutil.process_iter(["cmdline", "create_time"])
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] >= started
        ]
        assert workers, "no Ray Train worker of this run found"
        workers[-1].send_signal(signal.SIGKILL)

    args = launch_cmd(
        "train", *FAST, "--data", tiny_data, "--storage", tmp_path, "--name", "elastic", "--epochs", "4",
        "--warmup-epochs", "0.5", "--log-every", "1", "--checkpoint-every-steps", "3", "--max-failures", "2",
    )  # fmt: skip
    status, out = watch(args, [("epoch 2/4 step 2/6", kill_a_worker)])  # mid-run: 2 epochs and 4 steps left
    assert status == 0, out[-4000:]
    resumed = re.search(r"resumed from .*: epoch \d+, step (\d+) ", out)
    # Killed at step 8 or just after: no more than 3 steps lost, so the step-6 checkpoint (or a later one).
    assert resumed and int(resumed[1]) >= 6, out[-4000:]
    history = _history(tmp_path)
    assert [h["step"] for h in history] == [6, 12, 18, 24]


def _audit(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("rank*.jsonl")) for line in f.read_text().splitlines()]


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu"])
def test_a_node_lost_mid_epoch_at_a_world_size_that_does_not_divide_the_batch(tiny_data, tmp_path, cluster, backend):
    # 2:3 workers on a global batch of 32 (11 + 11 + 10 at 3): a node goes mid-epoch 2, the run goes on at 2
    # workers (16 + 16) from its last checkpoint, and the images of that epoch are each trained exactly once.
    for _ in range(3):
        add_worker_node(cluster)
    audit = tmp_path / "audit"

    def lose_a_node(*_):
        cluster.remove_node(cluster.list_all_nodes()[-1], allow_graceful=False)

    args = train_args(
        tiny_data, tmp_path, cluster, "--workers", "2:3", "--epochs", "2", "--warmup-epochs", "0.5",
        "--checkpoint-every-steps", "2", "--backend", backend, "--set", f"data.sample_log={audit}",
    )  # fmt: skip
    status, out = watch(args, [("epoch 2/2 step 3/6", lose_a_node)])
    assert status == 0, out[-4000:]
    assert "global batch 32 = 3 workers x 10-11 images" in out and "resize: world size 3 -> 2" in out
    assert [h["step"] for h in _history(tmp_path)] == [6, 12]
    resumed = re.search(r"resumed from .*: epoch 1, step \d+ \((\d+) into the epoch\)", out)
    assert resumed, out[-4000:]
    done_before = int(resumed[1])  # steps of epoch 2 the 3-worker group trained before the checkpoint it resumed from
    records = _audit(audit)
    first = [r for r in records if r["epoch"] == 0]
    assert {r["world_size"] for r in first} == {3} and sorted(len(r["indices"]) for r in first if r["step"] == 0) == [10, 11, 11]
    lineage = [r for r in records if r["epoch"] == 1 and (r["step"] < done_before) == (r["world_size"] == 3)]
    assert sorted({r["step"] for r in lineage}) == list(range(6))
    trained = [i for r in lineage for i in r["indices"]]
    from rn50_ray.data.order import epoch_order

    assert sorted(trained) == sorted(epoch_order(200, 0, 1)[:192].tolist())  # every image of the epoch, once
