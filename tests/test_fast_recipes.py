"""FFCV's fast ResNet-50 recipes: progressive resizing, validation at a higher resolution with flip TTA, the
triangular LR (tests/test_recipe.py) and BlurPool, each checked on its own, then a fast recipe learning through Ray."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, launch
from torch import nn

from rn50_ray.config import load_config, resolve
from rn50_ray.core.checkpoint import load_checkpoint
from rn50_ray.core.context import LocalContext
from rn50_ray.core.evaluation import evaluate
from rn50_ray.core.loop import fit
from rn50_ray.core.model import build_model
from rn50_ray.core.run_plan import plan_run
from rn50_ray.core.step import Precision
from rn50_ray.data.loaders import open_loaders
from rn50_ray.data.types import Shard

CPU = torch.device("cpu")


def ffcv_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """FFCV's train_imagenet.py, ImageNetTrainer.get_resolution, as published."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


@pytest.mark.parametrize("epochs", [16, 24, 88])
def test_the_resolution_schedule_is_ffcvs(epochs):
    recipe = yaml.safe_load((ROOT / "recipes" / f"rn50_fast_{epochs}e.yaml").read_text())
    r = recipe["resolution"]
    sizes = plan_run(load_config([str(ROOT / "recipes" / f"rn50_fast_{epochs}e.yaml")]), 1_281_167).sizes
    for epoch in range(epochs):
        assert sizes.at(epoch) == ffcv_get_resolution(epoch, 160, 192, r["end_epoch"], r["start_epoch"]), epoch
    assert sizes.at(0) == 160 and sizes.at(epochs - 1) == 192


def test_the_fast_recipes_carry_ffcvs_values():
    published = {16: (11, 13), 24: (17, 20), 88: (65, 76)}  # rn50_configs/rn50_<E>_epochs.yaml: start_ramp, end_ramp
    for epochs, (start, end) in published.items():
        cfg = load_config([str(ROOT / "recipes" / f"rn50_fast_{epochs}e.yaml")])
        assert (cfg.resolution.start_size, cfg.data.image_size, cfg.data.val_image_size) == (160, 192, 256)
        assert (cfg.resolution.start_epoch, cfg.resolution.end_epoch, cfg.schedule.epochs) == (start, end, epochs)
        assert cfg.optim.lr_per_256 * cfg.batch.global_size / 256 == pytest.approx(1.7)  # FFCV's lr for 8 x 512
        assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.label_smoothing) == (0.9, 1e-4, 0.1)
        assert (cfg.schedule.kind, cfg.schedule.peak_epoch, cfg.eval.flip_tta, cfg.model.blurpool) == (
            "triangular",
            2,
            True,
            True,
        )


def _ramp_cfg(data, backend: str, **extra):
    # 16 px up to epoch 0, 24 at epoch 1, 32 from epoch 2 (multiples of 8 at these toy sizes).
    return load_config([], {
        "data.path": str(data), "data.backend": backend, "data.image_size": 32, "data.loader_workers": 1,
        "resolution.start_size": 16, "resolution.start_epoch": 0, "resolution.end_epoch": 2, "resolution.multiple": 8,
        "batch.per_worker": 20, "batch.global_size": 20, "system.precision": "fp32", **extra,
    })  # fmt: skip


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu", "synthetic"])
def test_train_batches_come_at_the_scheduled_size(tiny_data, backend):
    cfg = _ramp_cfg(tiny_data, backend, **{"data.val_image_size": 40})
    _, loaders = open_loaders(resolve(cfg), Shard(0, 1, CPU), channels_last=False)
    sizes = [next(iter(loaders.train.epoch(e)))[0].shape[-1] for e in (0, 1, 2, 3)]
    assert sizes == [16, 24, 32, 32]
    assert next(iter(loaders.val.batches()))[0].shape[-2:] == (40, 40)  # evaluated at data.val_image_size


def _run(data, run_dir, **extra):
    torch.set_num_threads(1)
    cfg = _ramp_cfg(data, "pytorch", **{"schedule.epochs": 3, "schedule.warmup_epochs": 0.5, "run.log_every": 1,
                                       "data.loader_workers": 0, **extra})  # fmt: skip
    plan, loaders = open_loaders(resolve(cfg), Shard(0, 1, CPU), channels_last=False)
    ctx = LocalContext(run_dir, quiet=True, keep=10)
    fit(cfg, ctx, loaders, plan)
    return ctx


@pytest.mark.slow  # two 3-epoch runs: about 30 s
def test_a_run_killed_mid_ramp_resumes_at_the_right_size_with_the_same_losses(tiny_data, tmp_path):
    full = _run(tiny_data, tmp_path / "full")
    losses = {step: m["train/loss_step"] for step, m in full.tracked if "train/loss_step" in m}
    part = _run(tiny_data, tmp_path / "part", **{"run.checkpoint_every_steps": 13, "run.stop_after_epochs": 2})
    for p in part.checkpoints():  # "crash" 3 steps into epoch 2, the 24 px epoch: keep only that checkpoint
        if not p.name.endswith("_step00000013"):
            shutil.rmtree(p)
    resumed = _run(tiny_data, tmp_path / "part", **{"run.checkpoint_every_steps": 13})
    again = {step: m["train/loss_step"] for step, m in resumed.tracked if "train/loss_step" in m}
    assert min(again) == 14 and len(again) == 17
    for step, loss in again.items():
        assert loss == pytest.approx(losses[step], rel=1e-5), step
    history = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [h["train/resolution"] for h in history] == [16, 24, 32]
    state = load_checkpoint(resumed.latest_checkpoint())
    assert state["progress"]["step"] == 30


def test_flip_tta_evaluates_the_mean_of_both_flips_logits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    model(images)
    fp32 = Precision("fp32", "cpu")
    with torch.no_grad():
        logits = (model(images) + model(images.flip(3))) / 2  # by hand: left/right mirrors, logits averaged
    got = evaluate(model, [(images, labels)], 5, fp32, CPU, flip_tta=True)
    assert got["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert got["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    plain = evaluate(model, [(images, labels)], 5, fp32, CPU)
    assert plain["loss"] != pytest.approx(got["loss"])


def test_blurpool_keeps_the_parameters_and_is_off_by_default():
    import torchvision

    reference = torchvision.models.resnet50(weights=None).state_dict()
    plain = build_model(num_classes=1000)
    plain.load_state_dict(reference, strict=True)  # without BlurPool: torchvision's state dict, key for key
    blurred = build_model(num_classes=1000, blurpool=True)
    count = sum(p.numel() for p in blurred.parameters())
    assert count == sum(p.numel() for p in plain.parameters()) == 25_557_032  # the blur adds no parameters
    blurs = [m for m in blurred.modules() if type(m).__name__ == "BlurPool2d"]
    assert len(blurs) == 6  # before the 3 strided 3x3 convs and the 3 strided downsample convs (the stem's is skipped)
    out = blurred(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (2, 1000) and blurred.layer2[0].conv2[1].weight.grad is not None


@pytest.mark.ray
def test_a_fast_recipe_learns_through_ray(sample_data, tmp_path):
    """rn50_fast_16e at toy sizes through Ray, with its ramp, TTA and BlurPool on. The pytorch backend: the quick
    start's dali-cpu learns in test_train_ray.py, and test_dali.py shows both backends give the same batches."""
    out = launch(
        "train", "--recipe", "rn50_fast_16e", "--data", sample_data, "--storage", tmp_path, "--name", "fast",
        "--backend", "pytorch", "--workers", "2", "--gpus-per-worker", "0", "--cpus-per-worker", "1",
        "--batch-size", "16", "--global-batch", "32", "--precision", "fp32", "--epochs", "5", "--image-size", "32",
        "--val-image-size", "40", "--loader-workers", "1", "--log-every", "10",
        "--set", "resolution.start_size=24", "--set", "resolution.start_epoch=1", "--set", "resolution.end_epoch=3",
        "--set", "resolution.multiple=8",
        # the toy scale's LR, crop and init are cpu_demo's: a batch of 32 of 32 px images
        "--set", "data.crop_area_min=0.35", "--lr-per-256", "0.15", "--set", "model.zero_init_last_bn=true",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    history = [json.loads(x) for x in (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()]
    assert [h["train/resolution"] for h in history] == [24, 24, 32, 32, 32]  # the ramp, through Ray
    assert history[-1]["val/top1"] >= 30.0, history  # chance is 10%
    assert "data: pytorch backend" in out.stdout and "train size 24 px, then 32 px from epoch 3" in out.stdout
