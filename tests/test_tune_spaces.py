"""Search space files: the shipped ones load, and every mistake names the file, the key and what was expected."""

from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from rn50_ray.errors import ConfigError
from rn50_ray.tune.spaces import load_space

GOOD = {
    "metric": "val/top1",
    "mode": "max",
    "num_samples": 2,
    "scheduler": {"type": "asha", "grace_period": 1},
    "params": {"optim.lr_per_256": {"loguniform": [0.05, 0.5]}, "optim.momentum": {"uniform": [0.8, 0.95]}},
}


@pytest.mark.parametrize("name", ["lr_momentum_warmup", "pbt_lr_momentum", "smoke"])
def test_shipped_spaces_load(name):
    space = load_space(ROOT / "tune_spaces" / f"{name}.yaml")
    assert space.params and space.metric == "val/top1" and space.mode == "max"


def test_a_space_becomes_tune_domains():
    space = load_space(ROOT / "tune_spaces" / "lr_momentum_warmup.yaml")
    domains = space.to_tune()
    assert set(domains) == {"optim.lr_per_256", "optim.momentum", "schedule.warmup_epochs"}
    assert 0.128 <= domains["optim.lr_per_256"].sample() <= 0.512
    assert space.scheduler == {"type": "asha", "grace_period": 5, "reduction_factor": 3} and space.search == "optuna"


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _with(**changes):
    data = {**GOOD, **changes}
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize(
    "data, message",
    [
        (_with(params={"optim.lr_per_256": {"gaussian": [0, 1]}}), "params.optim.lr_per_256: expected a distribution of uniform"),
        (_with(params={"optim.lr_per_256": {"uniform": [0.5, 0.1]}}), "params.optim.lr_per_256.uniform: expected low < high"),
        (_with(params={"optim.lr_per_256": {"loguniform": [0, 1]}}), "loguniform: expected bounds > 0 (a log scale)"),
        (_with(params={"optim.lr_per_256": {"loguniform": [0.1]}}), "loguniform: expected [low, high] with 0 < low"),
        (_with(params={"optim.learning_rate": {"uniform": [0, 1]}}), "params.optim.learning_rate: expected a config key"),
        (_with(params={"optim.momentum": {"choice": []}}), "params.optim.momentum.choice: expected a non-empty list"),
        (_with(metric="val/accuracy"), "metric: expected a metric the trainer reports (val/top1"),
        (_with(mode="maximize"), "mode: expected min or max, got 'maximize'"),
        (_with(num_samples=0), "num_samples: expected a positive integer, got 0"),
        (_with(scheduler={"type": "hyperband"}), "scheduler.type: expected one of fifo, asha, pbt"),
        (_with(scheduler={"type": "pbt"}), "scheduler.mutations: expected a mapping of some params keys"),
        (
            _with(scheduler={"type": "pbt", "mutations": {"optim.lr_per_256": 0.1}}),
            "scheduler.mutations.optim.lr_per_256: expected a non-empty list of values",
        ),
        (
            _with(scheduler={"type": "pbt", "synch": "yes", "mutations": {"optim.lr_per_256": [0.1, 0.2]}}),
            "scheduler.synch: expected true or false, got 'yes'",
        ),
        (_with(search="bayes"), "search: expected one of random, grid, optuna, hyperopt, got 'bayes'"),
        (_with(params={"optim.momentum": {"grid": [0.8, 0.9]}}), "search: expected grid, since params use grid"),
        (_with(resources={"workers": "0"}), "resources: scale.workers: expected N or MIN:MAX"),
        (_with(resources={"nodes": 2}), "resources: expected a mapping with workers"),
        (_with(base={"optim": {"lr": 1}}), "optim.lr"),
        (_with(trials=3), "trials: expected one of the keys"),
    ],
)
def test_bad_space_files_fail_clearly(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_space(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


def test_a_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="search space file not found"):
        load_space(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("params: [unclosed")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_space(tmp_path / "bad.yaml")
