"""One typed, validated config: dataclass defaults, then YAML files, then dotted overrides.

Defaults are NVIDIA's ResNet50 v1.5 recipe for 90 epochs. The config crosses process
boundaries as `to_dict()`: the same dict goes to the Ray workers, into every checkpoint and
to MLflow. Standard library and PyYAML only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rn50_ray.config_sections import (  # noqa: F401 - the sections are part of this module's interface
    BatchConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    ResolutionConfig,
    RunOptions,
    ScaleConfig,
    ScheduleConfig,
    SystemConfig,
    TrackingConfig,
    parse_resources,
    parse_workers,
)
from rn50_ray.errors import ConfigError


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    run: RunOptions = field(default_factory=RunOptions)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        return merge(cls(), data, source)

    def with_overrides(self, overrides: dict[str, Any], source: str = "overrides") -> Config:
        """A copy with dotted-key overrides applied, and every check run again."""
        return check_consistency(merge(self, overrides, source))

    def get(self, key: str) -> Any:
        section, name = _split_key(key, "get")
        return getattr(getattr(self, section), name)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def shaping_items(self) -> dict[str, Any]:
        """The flattened keys that shape the result. Where and on how many workers a run trains
        does not (the global batch is fixed), so a run resumes across resizes and cluster moves."""
        return {k: v for k, v in flatten(self.to_dict()).items() if not k.startswith(NOT_SHAPING)}

    def fingerprint(self) -> str:
        """Short hash of everything that shapes the result; the default run name uses it."""
        return hashlib.sha1(json.dumps(self.shaping_items(), sort_keys=True).encode()).hexdigest()[:8]

    @property
    def min_workers(self) -> int:
        return parse_workers(self.scale.workers)[0]

    @property
    def max_workers(self) -> int:
        return parse_workers(self.scale.workers)[1]


NOT_SHAPING = ("run.", "scale.", "tracking.", "data.loader_workers", "data.screen_images", "data.sample_log", "data.val_batch")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    cls = typing.get_type_hints(Config)[section]
    return {f.name: f for f in dataclasses.fields(cls)}


def _split_key(key: str, source: str) -> tuple[str, str]:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"{source}: {key!r} is not a config key; sections are {', '.join(SECTIONS)}")
    if parts[1] not in _section_fields(parts[0]):
        valid = ", ".join(f"{parts[0]}.{k}" for k in _section_fields(parts[0]))
        raise ConfigError(f"{source}: {key!r} is not a config key; valid keys are {valid}")
    return parts[0], parts[1]


def choices_of(key: str) -> tuple | None:
    """The fixed choices of a config key, or None."""
    section, name = _split_key(key, "choices_of")
    return _section_fields(section)[name].metadata.get("choices")


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _section_fields(s)]


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Check a value against the field's annotated type (ints may stand for floats)."""
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{source}: {key}: expected a list of integers, got {value!r}")
        return list(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{source}: {key}: expected {hint.__name__}, got {value!r}")


def _validate(key: str, value: Any, meta: dict, source: str) -> None:
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{source}: {key}: expected one of {', '.join(meta['choices'])}, got {value!r}")
    check = meta.get("check")
    if check and not check[0](value):
        raise ConfigError(f"{source}: {key}: expected {check[1]}, got {value!r}")


def merge(cfg: Config, data: dict[str, Any], source: str) -> Config:
    """Return a copy of `cfg` with the nested or dotted keys of `data` applied and checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config sections, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if "." not in key and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    out = Config(**{s: dataclasses.replace(getattr(cfg, s)) for s in SECTIONS})
    hints = {s: typing.get_type_hints(type(getattr(cfg, s))) for s in SECTIONS}
    for key, value in flat.items():
        section, name = _split_key(key, source)
        meta = _section_fields(section)[name].metadata
        value = _coerce(key, value, hints[section][name], source)
        _validate(key, value, meta, source)
        setattr(getattr(out, section), name, value)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML, so numbers, booleans and lists keep their type."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, for example optim.lr_per_256=0.1")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's contents ({} when empty), or a ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_config(files: list[str] = (), overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then each YAML file in order, then the overrides (dotted keys)."""
    cfg = Config()
    for path in files:
        cfg = merge(cfg, read_yaml(path, "config file"), str(path))
    if overrides:
        cfg = merge(cfg, overrides, "command line")
    return check_consistency(cfg)


def check_consistency(cfg: Config) -> Config:
    """Checks that involve more than one field."""
    sched = cfg.schedule
    if sched.kind == "triangular":
        if sched.warmup_epochs:
            raise ConfigError(
                f"schedule.warmup_epochs: expected 0 with schedule.kind triangular (its rise to schedule.peak_epoch "
                f"is the warmup), got {sched.warmup_epochs}"
            )
        if sched.peak_epoch >= sched.epochs:
            raise ConfigError(
                f"schedule.peak_epoch: expected fewer than schedule.epochs ({sched.epochs}), got {sched.peak_epoch}"
            )
    elif sched.warmup_epochs >= sched.epochs and sched.warmup_epochs > 0:
        raise ConfigError(
            f"schedule.warmup_epochs: expected fewer than schedule.epochs ({sched.epochs}), got {sched.warmup_epochs}; "
            f"pass --warmup-epochs"
        )
    res = cfg.resolution
    if res.start_size and not res.start_epoch <= res.end_epoch:
        raise ConfigError(
            f"resolution.end_epoch: expected at least resolution.start_epoch ({res.start_epoch}), got {res.end_epoch}"
        )
    gs = cfg.batch.global_size
    if gs and cfg.max_workers > gs:
        raise ConfigError(
            f"scale.workers: expected at most batch.global_size ({gs}) workers, got {cfg.scale.workers}: "
            f"every worker needs at least one image per step"
        )
    return cfg


def resolve(cfg: Config) -> Config:
    """Fill what the defaults leave open: the global batch, then the run name (from what shapes the result, the
    resolved global batch included), and absolute local paths. Called once per command."""
    from rn50_ray.core.run_plan import global_batch  # pure Python: the one rule for the global batch

    cfg = dataclasses.replace(cfg, batch=dataclasses.replace(cfg.batch, global_size=global_batch(cfg.batch, cfg.max_workers)))
    name = cfg.run.name or f"rn50-{cfg.data.backend}-{cfg.fingerprint()}"  # the data path as given: same command, same name
    data = dataclasses.replace(cfg.data, path=absolute(cfg.data.path) if cfg.data.path else "")
    run = dataclasses.replace(cfg.run, name=name, storage=absolute(cfg.run.storage))
    return dataclasses.replace(cfg, data=data, run=run)


def is_remote(path: str) -> bool:
    """A URI (s3://, gs://, ...), not a local path."""
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute; a URI as it is."""
    return path if is_remote(path) else os.path.abspath(path)


def field_help() -> dict[str, str]:
    return {f"{s}.{k}": f.metadata.get("help", "") for s in SECTIONS for k, f in _section_fields(s).items()}
