"""The GPU fast-path switches do what they say, each can be turned off, and training makes no host sync
per step. Run on the CPU; what only a GPU shows (speed, cudnn.benchmark) is bench/gpu_check.sh's job."""

import pytest
import torch

from rn50_ray.config import load_config
from rn50_ray.core.context import LocalContext
from rn50_ray.core.loop import Trainer, fit, use_channels_last
from rn50_ray.core.recipe import plan_batches
from rn50_ray.data import Shard, make_loaders

CPU = torch.device("cpu")


def _cfg(data, **overrides):
    base = {"data.path": str(data), "data.image_size": 32, "data.loader_workers": 1, "batch.per_worker": 20}
    return load_config([], {**base, "batch.global_size": 20, "system.precision": "fp32", **overrides})


def _first_batch(cfg, channels_last: bool):
    loaders = make_loaders(cfg.data, Shard(0, 1, CPU), 20, global_batch=20, seed=0, channels_last=channels_last)
    return next(iter(loaders.train.epoch(0)))[0], loaders


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu", "synthetic"])
@pytest.mark.parametrize("fmt", ["channels_last", "contiguous"])
def test_memory_format_reaches_the_weights_and_the_input(tiny_data, backend, fmt):
    cfg = _cfg(tiny_data, **{"model.memory_format": fmt, "data.backend": backend})
    on = use_channels_last(cfg.model.memory_format, CPU)
    assert on == (fmt == "channels_last")
    trainer = Trainer(cfg, CPU, 10, plan_batches(20, 1, 20), 10)
    assert trainer.model.conv1.weight.is_contiguous(memory_format=torch.channels_last) == on
    images, _ = _first_batch(cfg, on)
    assert images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) == on
    if on:
        assert not images.is_contiguous()  # really NHWC in memory, not a 1-channel or 1-pixel edge case


def test_memory_format_auto_is_channels_last_on_cuda_only():
    assert use_channels_last("auto", torch.device("cuda", 0)) and not use_channels_last("auto", CPU)


@pytest.mark.parametrize(("impl", "fused", "foreach"), [("fused", True, None), ("foreach", None, True), ("for-loop", None, None)])
def test_sgd_kernel_switch(tiny_data, impl, fused, foreach):
    trainer = Trainer(_cfg(tiny_data, **{"optim.impl": impl}), CPU, 10, plan_batches(20, 1, 20), 10)
    assert trainer.optimizer.defaults["fused"] == fused and trainer.optimizer.defaults["foreach"] == foreach


def test_compile_switch_wraps_the_model(tiny_data):
    plain = Trainer(_cfg(tiny_data), CPU, 10, plan_batches(20, 1, 20), 10)
    assert plain.wrap(1) is plain.model
    compiled = Trainer(_cfg(tiny_data, **{"system.compile": True}), CPU, 10, plan_batches(20, 1, 20), 10)
    wrapped = compiled.wrap(1)
    assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule) and wrapped._orig_mod is compiled.model


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_switch_sets_dali_and_dataloader_depth(tiny_data, depth):
    _, dali = _first_batch(_cfg(tiny_data, **{"data.backend": "dali-cpu", "data.prefetch": depth}), False)
    assert dali.train.iterator._pipes[0].prefetch_queue_depth == depth
    _, torch_loaders = _first_batch(_cfg(tiny_data, **{"data.backend": "pytorch", "data.prefetch": depth}), False)
    assert torch_loaders.train.loader.prefetch_factor == depth
    assert torch_loaders.train.loader.pin_memory is False  # pinned memory only when the device is a GPU


def test_training_reads_the_host_only_at_log_intervals(tiny_data, tmp_path, monkeypatch):
    # 10 steps logged every 5: device -> host reads must scale with intervals and epochs, not with steps.
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = _cfg(
        tiny_data,
        **{
            "data.backend": "synthetic",
            "data.synthetic_samples": 200,
            "run.log_every": 5,
            "schedule.epochs": 1,
            "schedule.warmup_epochs": 0,
        },
    )
    loaders = make_loaders(cfg.data, Shard(0, 1, CPU), 20, global_batch=20, seed=0, channels_last=False)
    ctx = LocalContext(tmp_path, quiet=True)
    start = len(reads)
    fit(cfg, ctx, loaders, plan_batches(20, 1, 20))
    steps = ctx.reports[-1]["step"]
    assert steps == 10
    assert len(reads) - start <= 12, reads[start:]  # 2 intervals and 1 epoch end: a few reads each, never one per step
