import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from rn50_ray.config import OptimConfig, ScheduleConfig
from rn50_ray.core.model import build_model
from rn50_ray.core.recipe import build_ema, build_optimizer, build_scheduler, param_groups, peak_lr, plan_batches


def lr_curve(kind: str, epochs=10, warmup=2, spe=10, base=2.048, **kw) -> list[float]:
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


@pytest.mark.parametrize("world, micro, accum", [(1, 256, 8), (2, 256, 4), (8, 256, 1), (16, 128, 1), (3, None, None)])
def test_batch_plan_keeps_the_global_batch(world, micro, accum):
    if micro is None:
        with pytest.raises(ValueError, match="not divisible"):
            plan_batches(2048, world, 256)
        return
    plan = plan_batches(2048, world, 256)
    assert (plan.micro, plan.accum) == (micro, accum)
    assert plan.micro * plan.accum * world == 2048
    assert plan.steps_per_epoch(1_281_167) == 625


def test_weight_ema_follows_nvidias_formula_without_reading_the_device(host_reads):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ema = build_ema(model, 0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}  # it starts from the weights it was made with
    start = len(host_reads)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 4))  # train mode: BatchNorm's running stats and batch count move too
        ema.update_parameters(model)
        for k, v in model.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * v if v.is_floating_point() else v.clone()
        assert host_reads[start:] == []  # each would be a GPU sync per step
    got = {k.removeprefix("module."): v for k, v in ema.state_dict().items() if k != "n_averaged"}
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    assert got["1.num_batches_tracked"].item() == 3 and ema.n_averaged.item() == 3
    loaded = AveragedModel(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)), use_buffers=True)
    loaded.load_state_dict(ema.state_dict())  # as `launch.py evaluate` loads a checkpoint's EMA
