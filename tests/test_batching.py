"""Any world size trains the same update: the core loop in real gloo groups of 1, 2, 3 and 5 processes (no Ray)
on a global batch of 24, which 5 does not divide, against one process.

BatchNorm normalises over each rank's micro-batch, so it differs with the world size by design (as in any DDP
job without SyncBatchNorm; the README says so). These runs swap it for GroupNorm, whose output depends on each
image alone, so that what is compared is the batch plan itself: the images of each step, their augmentation,
the loss weights and DDP's averaging.
"""

import pytest
import torch
from ranks import run_ranks
from torch import nn

from rn50_ray.config import load_config, resolve
from rn50_ray.core import trainer as trainer_module
from rn50_ray.core.checkpoint import load_checkpoint
from rn50_ray.core.context import LocalContext
from rn50_ray.core.loop import fit
from rn50_ray.data.loaders import open_loaders
from rn50_ray.data.types import Shard


def _group_norm(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            norm = nn.GroupNorm(1, child.num_features)
            norm.weight.data.copy_(child.weight.data)  # keeps the zero-init residual gammas: a stable start
            setattr(model, name, norm)
        else:
            _group_norm(child)
    return model


def _train(rank: int, world: int, data: str, run_dir: str, backend: str) -> dict:
    build = trainer_module.build_model
    trainer_module.build_model = lambda **kw: _group_norm(build(**kw))
    cfg = load_config(
        [],
        {
            "data.path": data, "data.backend": backend, "data.image_size": 32,
            "data.loader_workers": 0 if backend == "pytorch" else 1,
            "batch.global_size": 24, "batch.per_worker": 4, "schedule.epochs": 1, "schedule.warmup_epochs": 0,
            "system.precision": "fp32", "optim.lr_per_256": 0.1, "run.log_every": 1, "model.zero_init_last_bn": True,
        },
    )  # fmt: skip
    shard = Shard(rank, world, torch.device("cpu"))
    plan, loaders = open_loaders(resolve(cfg), shard, channels_last=False, log=lambda line: None)
    ctx = LocalContext(run_dir, quiet=True, rank=rank, world_size=world)
    fit(cfg, ctx, loaders, plan)
    losses = [m["train/loss_step"] for _, m in ctx.tracked if "train/loss_step" in m]
    weights = load_checkpoint(ctx.latest_checkpoint())["model"] if rank == 0 else None
    return {"losses": losses, "weights": weights, "accum": plan.batch.accum(rank), "share": plan.batch.share(rank)}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """8 train and 2 val images a class: 80 images, 3 steps of 24."""
    from conftest import _need_fashion_mnist

    from rn50_ray.data.sample import prepare_sample

    _need_fashion_mnist()
    return prepare_sample(tmp_path_factory.mktemp("data") / "small", train_per_class=8, val_per_class=2, size=32)


def _compare(runs: dict[int, list[dict]]) -> None:
    reference = runs[1][0]
    assert len(reference["losses"]) == 3
    for world, ranks in runs.items():
        assert sum(r["share"] for r in ranks) == 24
        assert ranks[0]["losses"] == pytest.approx(reference["losses"], rel=2e-5), world
        for key, value in reference["weights"].items():
            torch.testing.assert_close(ranks[0]["weights"][key], value, rtol=1e-4, atol=1e-5, msg=f"{key} at W={world}")


@pytest.mark.slow  # five process groups of a real run: about a minute
def test_every_world_size_makes_the_single_process_update(small_data, tmp_path):
    runs = {w: run_ranks(w, _train, str(small_data), str(tmp_path / f"w{w}"), "pytorch") for w in (1, 2, 3, 5)}
    assert [r["share"] for r in runs[5]] == [5, 5, 5, 5, 4]  # 24 over 5 ranks: shares differ by one image
    assert [r["accum"] for r in runs[1]] == [6] and [r["accum"] for r in runs[5]] == [2, 2, 2, 2, 1]  # micro <= 4
    _compare(runs)


@pytest.mark.slow  # four process groups: about 30 s
def test_dali_makes_the_same_update_at_one_and_three_workers(small_data, tmp_path):
    runs = {w: run_ranks(w, _train, str(small_data), str(tmp_path / f"w{w}"), "dali-cpu") for w in (1, 3)}
    _compare(runs)
