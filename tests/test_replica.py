"""`--fault-tolerance replica` (rn50_ray/replica.py, torchft through Ray Train's TorchftConfig) on the CPU: gloo,
3 workers on a local Ray. A worker SIGKILLed from outside mid-epoch stops no one: the survivors' processes go on,
every committed step holds its global batch (split among its participants), each image of an epoch is trained
once, and the replacement copies the live state from a peer and ends with the same weights as the others."""

from __future__ import annotations

import json
import re
import signal
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import FAST, launch_cmd, watch

pytest.importorskip("torchft", reason="needs torchft (requirements.txt: CPython 3.11)")
pytestmark = pytest.mark.ray

GLOBAL_BATCH, TRAIN_IMAGES = 48, 1000  # the sample: 20 steps an epoch, 16 images a worker of 3


def _is_worker(p: psutil.Process) -> bool:
    try:
        return "RayTrainWorker" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def _workers(driver_pid: int) -> list[psutil.Process]:
    """The run's Ray Train workers (not their DataLoader processes, which carry the same name)."""
    started = psutil.Process(driver_pid).create_time()
    found = [p for p in psutil.process_iter(["create_time"])
             if _is_worker(p) and p.info["create_time"] >= started and not _is_worker(p.parent())]  # fmt: skip
    return sorted(found, key=lambda p: p.info["create_time"])


def _run(sample_data: Path, tmp_path: Path, kills: list[tuple[str, str]], epochs: int = 2, backend: str = "pytorch",
         *extra: str) -> tuple[int, str, dict]:  # fmt: skip
    """Train with a sample log; at each marker, SIGKILL a worker: "any" (not rank 0's process) or "rank0" (the one
    whose sample log says it held participating rank 0 at its last step)."""
    log_dir = tmp_path / "samples"
    killed: dict = {"pids": [], "survivors": []}

    def kill(which: str):
        def act(line, proc):
            workers = _workers(proc.pid)
            if which == "rank0":
                victim = next(p for p in workers if _last_rank(log_dir, p.pid) == 0)
            else:
                victim = next(p for p in workers if _last_rank(log_dir, p.pid) not in (0, None))
            killed["survivors"].append(sorted(p.pid for p in workers if p.pid != victim.pid))
            killed["pids"].append(victim.pid)
            victim.send_signal(signal.SIGKILL)

        return act

    cmd = launch_cmd(
        "train", *FAST, "--data", sample_data, "--storage", tmp_path / "runs", "--name", "replica", "--tracking", "off",
        "--fault-tolerance", "replica", "--workers", "3", "--cpus-per-worker", "0.5", "--global-batch", str(GLOBAL_BATCH),
        "--batch-size", "16", "--epochs", str(epochs), "--warmup-epochs", "0.5", "--log-every", "1", "--backend", backend,
        "--set", f"data.sample_log={log_dir}", *extra,
    )  # fmt: skip
    status, out = watch(cmd, [(marker, kill(which)) for marker, which in kills], timeout=900)
    return status, out, {**killed, "log_dir": log_dir}


def _records(log_dir: Path) -> dict[int, list[dict]]:
    by_pid: dict[int, list[dict]] = {}
    for f in log_dir.glob("rank*-pid*.jsonl"):
        by_pid[int(re.search(r"pid(\d+)", f.name)[1])] = [json.loads(x) for x in f.read_text().splitlines()]
    return by_pid


def _last_rank(log_dir: Path, pid: int) -> int | None:
    for f in log_dir.glob(f"rank*-pid{pid}.jsonl"):
        steps = [json.loads(x) for x in f.read_text().splitlines()]
        steps = [r for r in steps if "rank" in r]
        return steps[-1]["rank"] if steps else None
    return None


def _check_every_step(log_dir: Path, epochs: int, seed: int = 0) -> dict[tuple[int, int], int]:
    """Each committed step of each epoch holds exactly its global batch, order[t·N:(t+1)·N], split among the
    step's participants by their rank; so each image of an epoch is trained once. Returns participants per step."""
    from rn50_ray.data import order

    steps: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for records in _records(log_dir).values():
        for r in records:
            if "indices" in r:
                steps[(r["epoch"], r["step"])].append(r)
    per_epoch = TRAIN_IMAGES // GLOBAL_BATCH
    assert sorted(steps) == [(e, t) for e in range(epochs) for t in range(per_epoch)]  # none missing
    participants = {}
    for (epoch, t), records in steps.items():
        sizes = {r["world_size"] for r in records}
        assert len(sizes) == 1 and len(records) == sizes.pop(), (epoch, t, records)  # each participant once
        got = [i for r in sorted(records, key=lambda r: r["rank"]) for i in r["indices"]]
        perm = order.epoch_order(TRAIN_IMAGES, seed, epoch)
        assert got == perm[t * GLOBAL_BATCH : (t + 1) * GLOBAL_BATCH].tolist(), (epoch, t)  # the step's images, in order
        participants[(epoch, t)] = len(records)
    for epoch in range(epochs):
        seen = np.concatenate([r["indices"] for (e, _), rs in steps.items() if e == epoch for r in rs])
        assert len(seen) == len(set(seen.tolist())) == per_epoch * GLOBAL_BATCH  # each image once
    return participants


def _final_weights(log_dir: Path) -> dict[int, dict]:
    """Each worker's weights digest at the last epoch end it saw: {pid: {"step", "weights"}}."""
    out = {}
    for f in log_dir.glob("weights-pid*.jsonl"):
        out[int(re.search(r"pid(\d+)", f.name)[1])] = json.loads(f.read_text().splitlines()[-1])
    return out


def test_a_killed_worker_stops_no_one_and_its_replacement_heals_from_a_peer(sample_data, tmp_path):
    status, out, killed = _run(sample_data, tmp_path, [("epoch 1/2 step 6/20", "any")], 2, "pytorch", "--tracking", "required")
    assert status == 0, out[-5000:]
    log_dir = killed["log_dir"]
    participants = _check_every_step(log_dir, epochs=2)
    assert 2 in participants.values() and participants[(1, 19)] == 3  # went on with two, ended with three
    records = _records(log_dir)
    survivors = killed["survivors"][0]
    after = {pid for pid, rs in records.items() for r in rs if r.get("epoch") == 1}
    assert set(survivors) <= after  # the survivors trained on in the same processes: no restart
    assert "resumed from" not in out.split("replica: healed")[0].split("epoch 1/2 step 6/20")[-1]
    assert "replica: healed from a peer at step" in out
    final = {d["step"]: set() for d in _final_weights(log_dir).values()}
    for d in _final_weights(log_dir).values():
        final[d["step"]].add(d["weights"])
    assert len(final[2 * 20]) == 1  # the healed worker's weights equal the survivors', bit for bit
    summary = re.search(r"summary: 2 epochs, 40 steps, val top1 ([\d.]+)%", out)
    assert summary, out[-3000:]
    # MLflow: one run, the participants of each logged step as world_size, the heal counted, no step twice
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("rn50-ray").experiment_id])
    # every heal counts: the replacement's, and those of workers that came up after the first quorum at the start
    assert int(run.data.tags["rn50.heals"]) == out.count("replica: healed from a peer at step") >= 1
    heal_steps = [int(n) for n in re.findall(r"replica: healed from a peer at step (\d+)", out)]
    assert int(run.data.tags["rn50.last_heal_step"]) in heal_steps
    sizes = {m.value for m in client.get_metric_history(run.info.run_id, "world_size")}
    assert {2.0, 3.0} <= sizes
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_step")]
    assert steps == sorted(set(steps)) == list(range(1, 41))


def test_two_kills_in_one_epoch_the_second_of_rank_0_and_the_end_matches_a_run_without_them(sample_data, tmp_path):
    # The second kill takes the worker holding participating rank 0, which logs, tracks and writes checkpoints: the
    # next participant takes its place at the next step. With DALI: each change of participants builds this rank's
    # pipeline for its new share, from the step it is at.
    kills = [("epoch 1/1 step 3/20", "any"), ("epoch 1/1 step 13/20", "rank0")]
    status, out, killed = _run(sample_data, tmp_path, kills, 1, "dali-cpu")
    assert status == 0, out[-5000:]
    participants = _check_every_step(killed["log_dir"], epochs=1)
    assert 2 in participants.values()
    assert out.count("replica: healed from a peer at step") >= 2 and len(set(killed["pids"])) == 2
    steps_logged = [int(m) for m in re.findall(r"epoch 1/1 step (\d+)/20", out)]
    assert sorted(set(steps_logged)) == list(range(1, 21))  # progress lines went on under the new rank 0
    assert "checkpoint epoch0001_step00000020" in out
    digests = {d["weights"] for d in _final_weights(killed["log_dir"]).values() if d["step"] == 20}
    assert len(digests) == 1
    # Against the same run without kills: the same images in the same steps with the same global batch and loss
    # weights, so the same update but for BatchNorm, whose statistics are over each rank's share (48, 24 or 16 images
    # as one, two or three take part): the per-step losses (all-reduced over the step's participants, one line a
    # step) track each other, not bit for bit; their mean over the epoch moved by 0.03 in a measured pair. Not the
    # epoch's train loss: a killed rank takes its running sum with it, so that figure covers the others' shares
    # only. 200 val images after an epoch at 32 px: 5 points of top-1 is 10 images.
    status, clean, _ = _run(sample_data, tmp_path / "clean", [], 1, "dali-cpu")
    assert status == 0, clean[-3000:]

    def step_losses(text: str) -> list[float]:
        losses = dict(re.findall(r"epoch 1/1 step (\d+)/20 loss ([\d.]+)", text))
        assert sorted(map(int, losses)) == list(range(1, 21)), text[-3000:]
        return [float(v) for v in losses.values()]

    def top1(text: str) -> float:
        return float(re.findall(r"epoch 1/1 done in .* val top1 ([\d.]+)%", text)[-1])

    mean_a, mean_b = np.mean(step_losses(out)), np.mean(step_losses(clean))
    assert abs(mean_a - mean_b) < 0.1 and abs(top1(out) - top1(clean)) <= 5.0, (mean_a, mean_b, top1(out), top1(clean))


def test_a_stopped_replica_run_resumes_from_its_checkpoint(sample_data, tmp_path):
    # The loss of the whole run: checkpoints stay, written by participating rank 0 without Ray's report, and a
    # rerun of the same command resumes from the newest, as under restart.
    status, out, _ = _run(sample_data, tmp_path, [], 2, "pytorch", "--stop-after-epochs", "1")
    assert status == 0 and "stopping after 1 epoch(s) as asked" in out, out[-3000:]
    status, out, _ = _run(sample_data, tmp_path, [], 2)
    assert status == 0, out[-3000:]
    assert re.search(r"resumed from \S+/checkpoint_epoch0001_step00000020: epoch 1, step 20", out), out[-3000:]
    assert "summary: 2 epochs, 40 steps" in out and "epoch 1/2 step" not in out
    assert "replica: the whole worker group started from the last checkpoint (step 20)" in out  # a restart, said so
