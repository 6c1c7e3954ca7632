"""The GPU fast-path switches do what they say, each can be turned off, and training makes no host sync
per step. Run on the CPU; what only a GPU shows (speed, cudnn.benchmark) is bench/gpu_check.sh's job."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import run_ranks

from rn50_ray.config import load_config, resolve
from rn50_ray.core.context import LocalContext
from rn50_ray.core.loop import fit
from rn50_ray.core.recipe import build_optimizer, sgd_kernel
from rn50_ray.core.run_plan import plan_run
from rn50_ray.core.trainer import Trainer, input_format, use_channels_last
from rn50_ray.data.loaders import open_loaders
from rn50_ray.data.types import Shard
from rn50_ray.errors import ConfigError

CPU = torch.device("cpu")


def _cfg(data, **overrides):
    base = {"data.path": str(data), "data.image_size": 32, "data.loader_workers": 1, "batch.per_worker": 20}
    return resolve(
        load_config([], {**base, "batch.global_size": 20, "system.precision": "fp32", "scale.workers": "1", **overrides})
    )


def _plan(cfg, world: int = 1):
    return plan_run(cfg, 200, world)  # 10 steps of 20 images an epoch


def _first_batch(cfg, channels_last: bool):
    _, loaders = open_loaders(cfg, Shard(0, 1, CPU), channels_last=channels_last, log=lambda line: None)
    return next(iter(loaders.train.epoch(0)))[0], loaders


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu", "synthetic"])
@pytest.mark.parametrize("fmt", ["channels_last", "contiguous"])
def test_memory_format_reaches_the_weights_and_the_input(tiny_data, backend, fmt):
    cfg = _cfg(tiny_data, **{"model.memory_format": fmt, "data.backend": backend})
    on = use_channels_last(cfg.model.memory_format, CPU)
    assert on == (fmt == "channels_last")
    trainer = Trainer(cfg, CPU, 10, _plan(cfg))
    assert trainer.model.conv1.weight.is_contiguous(memory_format=torch.channels_last) == on
    images, _ = _first_batch(cfg, on)
    assert images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) == on
    if on:
        assert not images.is_contiguous()  # really NHWC in memory, not a 1-channel or 1-pixel edge case


def test_memory_format_auto_is_channels_last_on_cuda_only():
    assert use_channels_last("auto", torch.device("cuda", 0)) and not use_channels_last("auto", CPU)


@pytest.mark.parametrize(
    ("precision", "fmt", "on_cuda", "on_cpu"),
    [
        ("amp-bf16", "auto", (True, True), (False, False)),
        ("amp-fp16", "contiguous", (False, True), (False, False)),
        ("fp32", "channels_last", (True, False), (True, False)),
    ],
)
def test_the_input_layout_training_bench_and_evaluate_share(precision, fmt, on_cuda, on_cpu):
    # (channels_last, fp16 batches): DALI hands a GPU step under AMP half-precision NHWC batches.
    cfg = load_config([], {"system.precision": precision, "model.memory_format": fmt})
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # resolving sets them
    try:
        for device, want in ((torch.device("cuda", 0), on_cuda), (CPU, on_cpu)):
            layout = input_format(cfg, device)
            assert (layout["channels_last"], layout["fp16_input"]) == want, device
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.parametrize(
    ("impl", "fused", "foreach"),
    [("auto", True, False), ("fused", True, False), ("foreach", False, True), ("for-loop", False, False)],
)
def test_sgd_kernel_switch(tiny_data, impl, fused, foreach):
    cfg = _cfg(tiny_data, **{"optim.impl": impl})
    trainer = Trainer(cfg, CPU, 10, _plan(cfg))
    assert trainer.optimizer.defaults["fused"] == fused and trainer.optimizer.defaults["foreach"] == foreach


def test_sgd_kernel_under_a_loss_scaler():
    assert sgd_kernel("auto", torch.device("cuda", 0), loss_scaling=False) == "fused"
    assert sgd_kernel("auto", torch.device("cuda", 0), loss_scaling=True) == "foreach"
    assert sgd_kernel("auto", CPU, loss_scaling=True) == "for-loop"
    with pytest.raises(ConfigError, match=r"optim\.impl: fused SGD is unsafe with amp-fp16"):
        sgd_kernel("fused", CPU, loss_scaling=True)


@pytest.mark.parametrize("kernel", ["fused", "auto"])
def test_a_step_the_loss_scaler_skips_leaves_the_momentum_alone(tiny_data, kernel):
    """Why `auto` avoids fused SGD under amp-fp16: torch's fused kernel (shown here on CPU) puts the
    overflowing gradient into the momentum buffer of a step GradScaler skips."""
    cfg = _cfg(tiny_data, **{"system.precision": "amp-fp16", "system.loss_scale": 2.0**40, "batch.global_size": 4})
    trainer = Trainer(cfg, CPU, 10, plan_run(cfg, 40))
    if kernel == "fused":  # built by hand: the Trainer refuses it
        trainer.optimizer = build_optimizer(trainer.model, cfg.optim, 0.1, "fused")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.step(trainer.model, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert trainer.scaler.get_scale() < 2.0**40  # the scale overflowed fp16 and the step was skipped
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    buffers = [s["momentum_buffer"] for s in trainer.optimizer.state.values() if s.get("momentum_buffer") is not None]
    corrupted = any(b.abs().max() > 1e6 for b in buffers)
    assert corrupted == (kernel == "fused")


def test_compile_switch_wraps_the_model(tiny_data):
    cfg = _cfg(tiny_data)
    plain = Trainer(cfg, CPU, 10, _plan(cfg))
    assert plain.wrap(1) is plain.model
    cfg = _cfg(tiny_data, **{"system.compile": True})
    compiled = Trainer(cfg, CPU, 10, _plan(cfg))
    wrapped = compiled.wrap(1)
    assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule) and wrapped._orig_mod is compiled.model


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_switch_sets_dali_and_dataloader_depth(tiny_data, depth):
    _, dali = _first_batch(_cfg(tiny_data, **{"data.backend": "dali-cpu", "data.prefetch": depth}), False)
    assert (
        dali.train.iterator._pipes[0].prefetch_queue_depth == depth and dali.val.iterator._pipes[0].prefetch_queue_depth == depth
    )
    _, torch_loaders = _first_batch(_cfg(tiny_data, **{"data.backend": "pytorch", "data.prefetch": depth}), False)
    assert torch_loaders.train.loader.prefetch_factor == depth
    assert torch_loaders.train.loader.pin_memory is False  # pinned memory only when the device is a GPU


def _ten_synthetic_steps(data, ctx, log_every: int = 5, **extra) -> None:
    """One epoch of 10 steps of 20 synthetic images, logged every `log_every` steps."""
    overrides = {"data.synthetic_samples": 200, "run.log_every": log_every, "schedule.epochs": 1, "schedule.warmup_epochs": 0}
    cfg = _cfg(data, **{"data.backend": "synthetic", **overrides, **extra})
    plan, loaders = open_loaders(cfg, Shard(ctx.world_rank, ctx.world_size, CPU), channels_last=False)
    fit(cfg, ctx, loaders, plan)


@pytest.mark.parametrize("ema_decay", [0.0, 0.99])
def test_training_reads_the_host_only_at_log_intervals(tiny_data, tmp_path, host_reads, ema_decay):
    # 10 steps logged every 5: device -> host reads must scale with intervals and epochs, not with steps,
    # with the weight EMA on too (torch's AveragedModel.update_parameters read the host twice a step).
    ctx = LocalContext(tmp_path, quiet=True)
    start = len(host_reads)
    _ten_synthetic_steps(tiny_data, ctx, **{"optim.ema_decay": ema_decay})
    steps = ctx.reports[-1]["step"]
    assert steps == 10 and ("val_ema/top1" in ctx.reports[-1]) == bool(ema_decay)
    limit = 12 if not ema_decay else 12 + 6  # the EMA model's own epoch-end evaluation reads a few more
    # 2 intervals and 1 epoch end: a few reads each, never one per step
    assert len(host_reads) - start <= limit, host_reads[start:]


class _Draining(LocalContext):
    """A run told of a drain at every ask, `seconds_left` before its node goes (under Ray the notice comes from
    Ray Train's watcher)."""

    def __init__(self, run_dir, poll_s: float, seconds_left: float = 100.0, **kw):
        super().__init__(run_dir, quiet=True, **kw)
        self.preemption_poll_s, self.asks, self.seconds_left = poll_s, 0, seconds_left

    def preemption(self):
        self.asks += 1
        return {"nodes": ["n1"], "seconds_left": self.seconds_left}


@pytest.mark.parametrize("poll_s, asks", [(0.0, 4), (3600.0, 1)])
def test_preemption_is_asked_at_most_once_per_poll_interval(tiny_data, tmp_path, poll_s, asks):
    # Each ask is a barrier through a Ray actor: asking at every log interval cost 2% of the step. Rank 0's word
    # to ask rides on an interval's all-reduce, so the asks come from the second interval (step 4) on.
    ctx = _Draining(tmp_path, poll_s)
    _ten_synthetic_steps(tiny_data, ctx, log_every=2)  # intervals end at steps 2, 4, 6, 8 and 10
    assert ctx.asks == asks
    assert [r["step"] for r in ctx.reports] == [4, 10]  # the notice at step 4 checkpointed there, once
    assert ctx.checkpoints()[-1].name.endswith("_step00000010")


def test_every_rank_takes_the_preemption_checkpoint_at_rank_0s_step(tiny_data, tmp_path):
    # The ranks' views differ: by rank 1's clock (ahead of rank 0's) the deadline has passed, sooner than a checkpoint,
    # and on its own it would not checkpoint. Rank 0 decides for all, through the interval's all-reduce; had the
    # ranks decided apart, rank 0 would wait in ray.train.report while rank 1 waited in an all-reduce.
    reports = run_ranks(2, _drained_rank, tiny_data, tmp_path)
    assert reports[0] == reports[1] == [4, 10]


def _drained_rank(rank: int, world: int, data, tmp_path) -> list[int]:
    ctx = _Draining(tmp_path / "run", 0.0, seconds_left=100.0 if rank == 0 else -1.0, rank=rank, world_size=world)
    _ten_synthetic_steps(data, ctx, log_every=2)
    return [r["step"] for r in ctx.reports]


def test_sgd_kernel_bench_prints_each_kernel_against_the_loop():
    script = Path(__file__).resolve().parent.parent / "bench" / "sgd_kernels.py"
    args = ["--image-size", "16", "--batch", "2", "--rounds", "2", "--window", "1", "--device", "cpu"]
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = dict(re.findall(r"^\s+(\S+)\s+[\d.]+ img/s\s+ratio to for-loop ([\d.]+)$", out.stdout, re.M))
    assert set(rows) == {"for-loop", "foreach", "fused"} and float(rows["for-loop"]) == 1.0, out.stdout
