import math

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from rn50_ray.config import OptimConfig, ScheduleConfig
from rn50_ray.core.batching import BatchPlan
from rn50_ray.core.model import build_model
from rn50_ray.core.recipe import build_ema, build_optimizer, build_scheduler, param_groups
from rn50_ray.core.run_plan import peak_lr


def lr_curve(kind: str, epochs=10, warmup=2.0, spe=10, base=2.048, **kw) -> list[float]:
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=base)
    sched = build_scheduler(opt, ScheduleConfig(kind=kind, epochs=epochs, warmup_epochs=warmup, **kw), spe)
    out = []
    for _ in range(epochs * spe):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_peak_lr_scales_with_global_batch():
    assert peak_lr(0.256, 2048) == pytest.approx(2.048)
    assert peak_lr(0.256, 256) == pytest.approx(0.256)


def test_warmup_then_cosine_per_iteration():
    lrs = lr_curve("cosine")  # 100 steps, 20 of warmup
    assert lrs[0] == pytest.approx(2.048 / 20)
    assert lrs[9] == pytest.approx(2.048 * 10 / 20)
    assert lrs[19] == pytest.approx(2.048)
    assert lrs[20] == pytest.approx(2.048)
    assert lrs[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 40 / 80)) * 2.048)
    assert lrs[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 79 / 80)) * 2.048)


def test_linear_and_step_schedules():
    lin = lr_curve("linear")
    assert lin[20] == pytest.approx(2.048)
    assert lin[60] == pytest.approx(2.048 * (1 - 40 / 80))
    step = lr_curve("step", milestones=[5, 8], gamma=0.1)
    assert step[49] == pytest.approx(2.048)
    assert step[50] == pytest.approx(0.2048)
    assert step[80] == pytest.approx(0.02048)


def test_scheduler_state_round_trip_continues_the_curve():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    sched = build_scheduler(opt, ScheduleConfig(epochs=10, warmup_epochs=2), 10)
    for _ in range(37):
        opt.step(), sched.step()
    opt2 = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    sched2 = build_scheduler(opt2, ScheduleConfig(epochs=10, warmup_epochs=2), 10)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(5):
        opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_no_weight_decay_on_any_bn_parameter_or_bias():
    model = build_model()
    decay, no_decay = param_groups(model, 1 / 32768)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 53  # downsample BNs included, unlike a name match on "bn"
    exempt = {id(p) for m in bn for p in m.parameters()} | {id(model.fc.bias)}
    assert {id(p) for p in no_decay["params"]} == exempt
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 1 / 32768
    assert len(decay["params"]) == 54  # 53 convolutions and the FC weight
    assert id(model.layer2[0].downsample[1].weight) in exempt


def test_optimizer_is_nvidia_sgd():
    opt = build_optimizer(build_model(num_classes=10), OptimConfig(), 2.048, "for-loop")
    g = opt.param_groups[0]
    assert (g["momentum"], g["nesterov"], g["lr"]) == (0.875, False, 2.048)


@pytest.mark.parametrize(
    "world, shares, micro, accum",
    [(1, [2048], 256, 8), (2, [1024], 256, 4), (3, [683, 682], 228, 3), (8, [256], 256, 1), (9, [228, 227], 228, 1),
     (16, [128], 128, 1), (32, [64], 64, 1)],
)  # fmt: skip
def test_batch_plan_keeps_the_global_batch_at_any_world_size(world, shares, micro, accum):
    plan = BatchPlan(2048, world, 256)
    got = [plan.share(r) for r in range(world)]
    assert sum(got) == 2048 and max(got) - min(got) <= 1 and sorted(set(got), reverse=True) == shares
    assert [plan.offset(r) for r in range(world)] == [sum(got[:r]) for r in range(world)]  # contiguous slices
    assert (plan.micro(0), plan.accum(0)) == (micro, accum) and all(plan.micro(r) <= 256 for r in range(world))
    assert plan.loss_weight == world / 2048


def test_a_batch_plan_needs_an_image_per_rank():
    with pytest.raises(ValueError, match=r"world size 33: expected 1 to batch\.global_size"):
        BatchPlan(32, 33, 16)


def test_weight_ema_is_nvidias_with_its_warmup_and_reads_no_device_value(host_reads):
    # NVIDIA's EMA: after optimizer step t (from 0), ema = d * ema + (1 - d) * weights, d = min(decay, (1+t)/(10+t)).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ema = build_ema(model, 0.5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}  # it starts from the weights it was made with
    start = len(host_reads)
    decays = []
    for t in range(25):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 4))  # train mode: BatchNorm's running stats and batch count move too
        ema.update_parameters(model)
        d = min(0.5, (1 + t) / (10 + t))
        decays.append(d)
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
        assert host_reads[start:] == []  # each would be a GPU sync per step
    assert decays[:3] == pytest.approx([0.1, 2 / 11, 0.25]) and decays[-1] == 0.5  # the warmup, then the decay
    got = {k.removeprefix("module."): v for k, v in ema.state_dict().items() if k != "n_averaged"}
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.allclose(got[k], v, atol=1e-5), k
    assert got["1.num_batches_tracked"].item() == 25 and ema.n_averaged.item() == 25
    loaded = AveragedModel(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)), use_buffers=True)
    loaded.load_state_dict(ema.state_dict())  # as `launch.py evaluate` loads a checkpoint's EMA


def test_triangular_schedule_rises_to_its_peak_epoch_then_falls_to_zero():
    # FFCV's get_cyclic_lr: np.interp(epoch, [0, peak, epochs], [1e-4 * lr, lr, 0]), stepped per iteration.
    lrs = lr_curve("triangular", epochs=10, warmup=0.0, spe=10, base=1.0, peak_epoch=2)
    expected = [float(np.interp(s / 10, [0, 2, 10], [1e-4, 1.0, 0.0])) for s in range(100)]
    assert lrs == pytest.approx(expected, abs=1e-9)
    assert max(lrs) == lrs[20] == pytest.approx(1.0) and lrs[0] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("impl", "fused", "foreach"), [("fused", True, False), ("foreach", False, True), ("for-loop", False, False)]
)
def test_sgd_kernel_flags_are_explicit(impl, fused, foreach):
    # None would let torch pick: its CUDA default is foreach, so `for-loop` must say foreach=False.
    opt = build_optimizer(build_model(num_classes=10), OptimConfig(), 0.1, impl)
    assert (opt.defaults["fused"], opt.defaults["foreach"]) == (fused, foreach)
