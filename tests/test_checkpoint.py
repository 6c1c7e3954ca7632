"""Checkpoints: atomic writes, safe loads, and exact resume of the core loop (no Ray)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rn50_ray.config import load_config, resolve
from rn50_ray.core.checkpoint import (
    ORPHAN_AGE_S,
    STATE_FILE,
    load_checkpoint,
    load_first_readable,
    remove_orphaned_staging,
    save_checkpoint,
    staging_dir,
)
from rn50_ray.core.context import LocalContext
from rn50_ray.core.loop import fit
from rn50_ray.core.run_plan import plan_run
from rn50_ray.core.trainer import Trainer
from rn50_ray.data.loaders import open_loaders
from rn50_ray.data.types import Shard
from rn50_ray.errors import UserError


def _run(data, run_dir, init_from=None, **overrides):
    cfg = load_config(
        [],
        {
            "data.path": str(data),
            "data.backend": "pytorch",
            "data.image_size": 32,
            "data.loader_workers": 0,
            "batch.per_worker": 20,
            "batch.global_size": 20,
            "schedule.epochs": 2,
            "schedule.warmup_epochs": 0.5,
            "system.precision": "fp32",
            "model.num_classes": 0,
            **overrides,
        },
    )
    plan, loaders = open_loaders(resolve(cfg), Shard(0, 1, torch.device("cpu")), channels_last=False, log=lambda line: None)
    ctx = LocalContext(run_dir, quiet=True, keep=cfg.run.keep_checkpoints, init_from=init_from)
    return fit(cfg, ctx, loaders, plan), ctx


def _weights(ctx):
    return load_checkpoint(ctx.latest_checkpoint())["model"]


def test_starting_from_another_runs_checkpoint_keeps_this_runs_hyperparameters(tiny_data, tmp_path):
    # PBT's exploit: weights, momentum buffers, progress and history come from the donor's checkpoint; the
    # LR schedule and the momentum are this run's own, as if it had used them from the start.
    torch.set_num_threads(1)
    _, donor = _run(tiny_data, tmp_path / "donor", **{"run.stop_after_epochs": 1})
    start = donor.latest_checkpoint()
    assert start.endswith("epoch0001_step00000010")
    mine = {"optim.lr_per_256": 0.5, "optim.momentum": 0.8}
    adopted, ctx = _run(tiny_data, tmp_path / "adopter", init_from=start, **mine)
    with ctx.open_checkpoint() as again:  # a restart now resumes its own checkpoint, not the donor's
        assert again == ctx.latest_checkpoint() and not ctx.from_init
    assert [p.name for p in ctx.checkpoints()] == ["checkpoint_epoch0002_step00000020"]  # one epoch trained
    assert [r["epoch"] for r in ctx.reports] == [2]
    state = load_checkpoint(ctx.latest_checkpoint())
    assert state["progress"]["history"][0] == load_checkpoint(start)["progress"]["history"][0]
    _, scratch = _run(tiny_data, tmp_path / "scratch", **mine)  # the same hyperparameters from step 0
    own = load_checkpoint(scratch.latest_checkpoint())
    for got, want in zip(state["optimizer"]["param_groups"], own["optimizer"]["param_groups"], strict=True):
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12) and got["momentum"] == want["momentum"] == 0.8
    donor_groups = load_checkpoint(start)["optimizer"]["param_groups"]
    assert donor_groups[0]["momentum"] != 0.8
    assert state["scheduler"]["last_epoch"] == own["scheduler"]["last_epoch"]
    assert adopted["step"] == 20


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tiny_data, tmp_path):
    torch.set_num_threads(1)  # fixed reduction order
    full, full_ctx = _run(tiny_data, tmp_path / "full")
    # "Crash" after step 13 (3 steps into epoch 2): keep only that checkpoint and resume from it.
    _, part_ctx = _run(
        tiny_data, tmp_path / "part", **{"run.checkpoint_every_steps": 13, "run.stop_after_epochs": 2, "run.keep_checkpoints": 10}
    )
    names = [p.name for p in part_ctx.checkpoints()]
    assert "checkpoint_epoch0001_step00000013" in names
    for p in part_ctx.checkpoints():
        if p.name != "checkpoint_epoch0001_step00000013":
            shutil.rmtree(p)
    resumed, resumed_ctx = _run(tiny_data, tmp_path / "part", **{"run.checkpoint_every_steps": 13, "run.keep_checkpoints": 10})
    assert resumed["step"] == full["step"] == 20
    assert resumed["train/loss"] != 0
    a, b = _weights(full_ctx), _weights(resumed_ctx)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert resumed["val/top1"] == pytest.approx(full["val/top1"])


def test_stop_and_resume_at_an_epoch_boundary(tiny_data, tmp_path):
    first, ctx = _run(tiny_data, tmp_path / "run", **{"run.stop_after_epochs": 1})
    assert (first["epoch"], first["finished"]) == (1, False)
    second, _ = _run(tiny_data, tmp_path / "run")
    assert (second["epoch"], second["step"], second["finished"]) == (2, 20, True)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"epoch": 1' in lines[0] and '"val/top1"' in lines[1]
    state = load_checkpoint(ctx.latest_checkpoint())
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "progress", "rng", "config"} <= state.keys()
    assert not any(k.startswith("module.") for k in state["model"])


def test_atomic_save_and_clear_errors_for_bad_files(tmp_path):
    save_checkpoint(tmp_path / "ok", {"model": {"w": torch.ones(3)}}, "a: 1\n")
    assert not list((tmp_path / "ok").glob(".*tmp"))
    assert torch.equal(load_checkpoint(tmp_path / "ok")["model"]["w"], torch.ones(3))
    data = (tmp_path / "ok" / "state.pt").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"state\.pt: checkpoint is truncated or not a checkpoint"):
        load_checkpoint(tmp_path / "cut")
    with pytest.raises(UserError, match="no checkpoint here"):
        load_checkpoint(tmp_path / "empty")
    torch.save({"x": 1}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not an rn50-ray checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_best_checkpoint_is_kept_apart_from_the_newest(tiny_data, tmp_path):
    _, ctx = _run(tiny_data, tmp_path / "run", **{"schedule.epochs": 3, "run.keep_checkpoints": 1})
    best = list((tmp_path / "run").glob("best_*"))
    assert len(best) == 1 and len(ctx.checkpoints()) == 1  # newest K=1, plus the best
    top1 = [r["val/top1"] for r in ctx.reports if "val/top1" in r]
    best_epoch = max(range(len(top1)), key=lambda i: (top1[i], -i)) + 1  # the first epoch with the highest top-1
    assert best[0].name.startswith(f"best_epoch{best_epoch:04d}_")
    state = load_checkpoint(best[0])
    assert state["progress"]["best_top1"] == pytest.approx(max(top1))


def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(tiny_data, tmp_path):
    run = tmp_path / "run"
    _run(tiny_data, run, **{"run.checkpoint_every_steps": 4, "run.stop_after_epochs": 1, "run.keep_checkpoints": 5})
    ctx = LocalContext(run)
    newest, before = ctx.checkpoints()[-1], ctx.checkpoints()[-2]
    assert newest.name == "checkpoint_epoch0001_step00000010" and before.name == "checkpoint_epoch0000_step00000008"
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # storage lost the end of the file
    cfg = {"run.checkpoint_every_steps": 4, "run.keep_checkpoints": 5}
    summary, ctx = _run(tiny_data, run, **cfg)
    assert summary["step"] == 20 and summary["finished"]
    assert ctx.reports[0]["step"] == 10  # epoch 1 was finished again from step 8, then epoch 2


class _OnDevice(LocalContext):
    """A context whose device is not the CPU. Under Ray a GPU worker's is cuda:N; here torch's `meta` device,
    which exists on every machine and, like a GPU, holds no CPU ByteTensor."""

    def __init__(self, run_dir, device):
        super().__init__(run_dir, quiet=True)
        self.device = torch.device(device)


def test_resume_loads_checkpoints_onto_the_cpu_whatever_the_device(tiny_data, tmp_path):
    # A resume used to load with map_location=ctx.device: the saved RNG states went to the GPU, and
    # torch.set_rng_state takes CPU ByteTensors only, so every resume on a GPU crashed.
    _, ctx = _run(tiny_data, tmp_path / "run", **{"run.stop_after_epochs": 1})
    saved = load_checkpoint(ctx.latest_checkpoint())
    state, path, stack = load_first_readable(_OnDevice(tmp_path / "run", "meta"), ctx.latest_checkpoint())
    with stack:
        assert path == ctx.latest_checkpoint()
        assert {t.device.type for t in (state["rng"]["torch"], state["model"]["fc.weight"])} == {"cpu"}
        cfg = load_config([], {"data.path": str(tiny_data), "system.precision": "fp32", "batch.global_size": 20})
        trainer = Trainer(cfg, torch.device("cpu"), 10, plan_run(cfg, 200))
        torch.manual_seed(123)  # moved on: the load must put the saved generator state back
        trainer.load_state_dict(state)
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    torch.testing.assert_close(trainer.model.fc.weight, saved["model"]["fc.weight"])
    assert trainer.progress.epoch == 1


def test_staging_folders_of_killed_writers_are_removed_once_old(tmp_path):
    # A worker SIGKILLed mid-report leaves its staging folder; only a dead writer's old folder goes.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, long_ago = int(dead.stdout), time.time() - 2 * ORPHAN_AGE_S
    folders = {
        "dead_old": tmp_path / f"rn50-ckpt-{dead_pid}-abc",
        "dead_new": tmp_path / f"rn50-ckpt-{dead_pid}-def",
        "live_old": tmp_path / f"rn50-ckpt-{os.getpid()}-ghi",
        "other": tmp_path / "rn50-ckpt-notapid",
    }
    for name, folder in folders.items():
        folder.mkdir()
        (folder / STATE_FILE).write_bytes(b"x")
        if name != "dead_new":
            os.utime(folder, (long_ago, long_ago))
    assert remove_orphaned_staging(tmp_path) == [folders["dead_old"]]
    assert [n for n, f in folders.items() if f.exists()] == ["dead_new", "live_old", "other"]
    with staging_dir() as tmp:
        assert Path(tmp).name.startswith(f"rn50-ckpt-{os.getpid()}-")
