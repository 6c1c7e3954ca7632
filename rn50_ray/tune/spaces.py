"""Search spaces as data: `tune_spaces/*.yaml`, checked before any trial starts.

A space file names the config keys to search with a distribution each, the metric and mode, the number
of samples, the scheduler (fifo, asha, pbt), the search algorithm (random, grid, optuna, hyperopt) and the
resources of a trial. Every mistake is reported with the file, the key and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rn50_ray.config import Config, all_keys, load_config, merge, read_yaml
from rn50_ray.errors import ConfigError

# (number of arguments, what they are)
DISTRIBUTIONS = {
    "uniform": (2, "[low, high]"),
    "loguniform": (2, "[low, high] with 0 < low"),
    "quniform": (3, "[low, high, q]"),
    "randint": (2, "[low, high) integers"),
    "choice": (None, "a non-empty list of values"),
    "grid": (None, "a non-empty list of values"),
}
# What `fit` reports at each epoch, so what a search can rank trials by.
REPORTED_METRICS = ("val/top1", "val/top5", "val/loss", "train/loss", "train/img_per_s", "val_ema/top1")
SCHEDULERS = {
    "fifo": {},
    "asha": {"grace_period": 1, "reduction_factor": 2},
    "pbt": {"perturbation_interval": 1, "quantile_fraction": 0.25, "resample_probability": 0.25, "synch": False},
}
SEARCHERS = ("random", "grid", "optuna", "hyperopt")
TOP_KEYS = {
    "metric", "mode", "num_samples", "max_concurrent_trials", "max_trial_failures", "scheduler", "search",
    "resources", "params", "base", "log_models", "log_checkpoints",
}  # fmt: skip
LOG_MODELS = ("best", "all", "none")  # which trials log their model to MLflow (about 100 MB for ResNet50)
LOG_CHECKPOINTS = ("uri", "copy")  # a trial's best checkpoint: its URI as a tag, or a copy (about 180 MB) as an artifact


@dataclass
class Space:
    source: str
    params: dict[str, tuple[str, list[Any]]]  # config key -> (distribution, arguments)
    metric: str = "val/top1"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent_trials: int = 1
    max_trial_failures: int = 1
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "fifo"})
    search: str = "random"
    workers: str = "1"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    base: dict[str, Any] = field(default_factory=dict)  # config overrides shared by every trial
    log_models: str = "best"
    log_checkpoints: str = "uri"

    def to_tune(self) -> dict[str, Any]:
        """The param space for ray.tune: {config key: tune domain}."""
        from ray import tune

        make = {
            "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a),
            "quniform": lambda a: tune.quniform(*a),
            "randint": lambda a: tune.randint(*a),
            "choice": lambda a: tune.choice(a),
            "grid": lambda a: tune.grid_search(a),
        }
        return {key: make[dist](args) for key, (dist, args) in self.params.items()}


def _fail(source: str, key: str, expected: str, got: Any) -> ConfigError:
    return ConfigError(f"{source}: {key}: expected {expected}, got {got!r}")


def _check_params(source: str, params: Any) -> dict[str, tuple[str, list[Any]]]:
    if not isinstance(params, dict) or not params:
        raise _fail(source, "params", "a mapping of config keys to distributions", params)
    keys = set(all_keys())
    out = {}
    for key, spec in params.items():
        where = f"params.{key}"
        if key not in keys:
            raise _fail(source, where, "a config key (see `launch.py train --help`)", key)
        if not isinstance(spec, dict) or len(spec) != 1:
            raise _fail(source, where, f"one distribution of {', '.join(DISTRIBUTIONS)}", spec)
        (dist, args), = spec.items()  # fmt: skip
        if dist not in DISTRIBUTIONS:
            raise _fail(source, where, f"a distribution of {', '.join(DISTRIBUTIONS)}", dist)
        n, what = DISTRIBUTIONS[dist]
        if not isinstance(args, list) or not args or (n is not None and len(args) != n):
            raise _fail(source, f"{where}.{dist}", what, args)
        if n is not None:
            if not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
                raise _fail(source, f"{where}.{dist}", f"numbers {what}", args)
            if args[0] >= args[1]:
                raise _fail(source, f"{where}.{dist}", "low < high", args)
            if dist == "loguniform" and args[0] <= 0:
                raise _fail(source, f"{where}.{dist}", "bounds > 0 (a log scale)", args)
            if dist == "quniform" and args[2] <= 0:
                raise _fail(source, f"{where}.{dist}", "q > 0", args)
        out[key] = (dist, args)
    return out


def _check_block(source: str, name: str, block: Any, allowed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    block = {"type": block} if isinstance(block, str) else block
    if not isinstance(block, dict) or block.get("type") not in allowed:
        raise _fail(source, f"{name}.type", f"one of {', '.join(allowed)}", block)
    extra = set(block) - {"type"} - set(allowed[block["type"]]) - ({"mutations"} if block["type"] == "pbt" else set())
    if extra:
        raise _fail(source, name, f"only the keys type, {', '.join(allowed[block['type']])}", sorted(extra))
    return {**allowed[block["type"]], **block}


def load_space(path: str | Path | None = None, *, text: str | None = None, source: str = "") -> Space:
    """A space file, or its `text` (a search's saved copy, wherever its storage is) named as `source`."""
    source = source or str(path)
    if text is None:
        raw = read_yaml(path, "search space file")
    else:
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise _fail(source, "(top level)", "a mapping", type(raw).__name__)
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise _fail(source, sorted(unknown)[0], f"one of the keys {', '.join(sorted(TOP_KEYS))}", sorted(unknown)[0])
    params = _check_params(source, raw.get("params"))
    metric, mode = raw.get("metric", "val/top1"), raw.get("mode", "max")
    if metric not in REPORTED_METRICS:
        raise _fail(source, "metric", f"a metric the trainer reports ({', '.join(REPORTED_METRICS)})", metric)
    if mode not in ("min", "max"):
        raise _fail(source, "mode", "min or max", mode)
    ints = {}
    for key, default in (("num_samples", 1), ("max_concurrent_trials", 1), ("max_trial_failures", 1)):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "max_trial_failures" else 1):
            raise _fail(source, key, "a positive integer", value)
        ints[key] = value
    scheduler = _check_block(source, "scheduler", raw.get("scheduler", "fifo"), SCHEDULERS)
    if scheduler["type"] == "pbt":
        mutations = scheduler.get("mutations")
        if not isinstance(mutations, dict) or not mutations or not set(mutations) <= set(params):
            raise _fail(source, "scheduler.mutations", "a mapping of some params keys to value lists", mutations)
        for key, values in mutations.items():
            if not isinstance(values, list) or not values:
                raise _fail(source, f"scheduler.mutations.{key}", "a non-empty list of values", values)
        if not 0 < scheduler["quantile_fraction"] <= 0.5:
            raise _fail(source, "scheduler.quantile_fraction", "a fraction in (0, 0.5]", scheduler["quantile_fraction"])
        if not isinstance(scheduler["synch"], bool):
            raise _fail(source, "scheduler.synch", "true or false", scheduler["synch"])
    search = raw.get("search", "random")
    search = search.get("type") if isinstance(search, dict) else search
    if search not in SEARCHERS:
        raise _fail(source, "search", f"one of {', '.join(SEARCHERS)}", search)
    grid = [k for k, (d, _) in params.items() if d == "grid"]
    if grid and search != "grid":
        raise _fail(source, "search", "grid, since params use grid", search)
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict) or set(resources) - {"workers", "cpus_per_worker", "gpus_per_worker"}:
        raise _fail(source, "resources", "a mapping with workers, cpus_per_worker, gpus_per_worker", resources)
    logging = {"log_models": raw.get("log_models", "best"), "log_checkpoints": raw.get("log_checkpoints", "uri")}
    for key, choices in (("log_models", LOG_MODELS), ("log_checkpoints", LOG_CHECKPOINTS)):
        if logging[key] not in choices:
            raise _fail(source, key, f"one of {', '.join(choices)}", logging[key])
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise _fail(source, "base", "a mapping of config sections, as in a recipe", base)
    merge(Config(), base, f"{source} (base)")  # raises naming the file and the key
    trial = {"scale.workers": str(resources.get("workers", "1"))}
    trial.update({f"scale.{k}": v for k, v in resources.items() if k != "workers"})
    try:
        load_config([], trial)
    except ConfigError as e:
        raise ConfigError(f"{source}: resources: {str(e).removeprefix('command line: ')}") from None
    space = Space(
        source=source,
        params=params,
        metric=metric,
        mode=mode,
        scheduler=scheduler,
        search=search,
        workers=str(resources.get("workers", "1")),
        cpus_per_worker=float(resources.get("cpus_per_worker", 1.0)),
        gpus_per_worker=float(resources.get("gpus_per_worker", 0.0)),
        base=base,
        **logging,
        **ints,
    )
    return space
