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

from rn50_ray.errors import ConfigError

PRECISIONS = ("auto", "fp32", "tf32", "amp-fp16", "amp-bf16")
BACKENDS = ("auto", "synthetic", "pytorch", "dali-cpu", "dali-gpu")
SCHEDULES = ("cosine", "step", "linear", "triangular")


def _opt(default: Any, help: str, choices: tuple | None = None, check: tuple | None = None) -> Any:
    """A config field with help text, and either a set of choices or a (predicate, expectation)."""
    meta = {"help": help, "choices": choices, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


POSITIVE = (lambda v: v > 0, "a number > 0")
NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
FRACTION = (lambda v: 0 <= v < 1, "a number in [0, 1)")


@dataclass
class ModelConfig:
    arch: str = _opt(
        "resnet50",
        "resnet50 is v1.5 (stride 2 in the 3x3 conv); resnet50-v1 puts it in the first 1x1",
        choices=("resnet50", "resnet50-v1"),
    )
    num_classes: int = _opt(0, "classes of the classifier; 0 takes the number of class folders", check=NON_NEGATIVE)
    conv_init: str = _opt("fan_in", "Kaiming-normal mode for the convolutions", choices=("fan_in", "fan_out"))
    zero_init_last_bn: bool = _opt(False, "zero the gamma of the last BN in each bottleneck")
    memory_format: str = _opt(
        "auto", "auto is channels_last on CUDA, contiguous on CPU", choices=("auto", "channels_last", "contiguous")
    )
    blurpool: bool = _opt(False, "blur before every strided conv with 16+ input channels (BlurPool, as FFCV's recipes)")


@dataclass
class DataConfig:
    path: str = _opt("", "ImageNet-style folder with train/<class>/*.JPEG and val/<class>/*.JPEG")
    backend: str = _opt(
        "auto", "input pipeline; auto is dali-gpu on GPU workers, dali-cpu on CPU workers, pytorch without DALI", choices=BACKENDS
    )
    image_size: int = _opt(
        224, "train crop size in pixels (the final one under progressive resizing)", check=(lambda v: v >= 16, "an integer >= 16")
    )
    val_image_size: int = _opt(
        0, "val crop size in pixels; 0 is data.image_size", check=(lambda v: v == 0 or v >= 16, "0 or an integer >= 16")
    )
    val_batch: int = _opt(0, "val images per forward pass per worker; 0 is batch.per_worker", check=NON_NEGATIVE)
    crop_area_min: float = _opt(
        0.08,
        "smallest area fraction of the random-resized crop (NVIDIA: 0.08)",
        check=(lambda v: 0 < v <= 1, "a number in (0, 1]"),
    )
    val_crop_ratio: float = _opt(
        0.875,
        "val resizes the shorter side to image_size / ratio, then center-crops",
        check=(lambda v: 0 < v <= 1, "a number in (0, 1]"),
    )
    loader_workers: int = _opt(4, "DataLoader processes (or DALI threads) per Ray worker", check=NON_NEGATIVE)
    prefetch: int = _opt(
        2, "batches prepared ahead (DALI prefetch_queue_depth, DataLoader prefetch_factor); 1 turns it off", check=POSITIVE
    )
    pin_memory: bool = _opt(True, "pinned host memory, so copies to the GPU overlap compute (pytorch backend)")
    synthetic_samples: int = _opt(12800, "train images per epoch of the synthetic backend", check=POSITIVE)
    skip_bad_images: bool = _opt(False, "skip undecodable images (and count them) instead of failing")
    screen_images: bool = _opt(True, "check every image file on the driver before training, so bad files are named up front")
    sample_log: str = _opt("", "a local folder: each rank logs the image indices of every step (audits of elastic runs)")


@dataclass
class ResolutionConfig:
    start_size: int = _opt(
        0,
        "progressive resizing: the train size up to start_epoch, ramping to data.image_size by end_epoch; 0 is off",
        check=(lambda v: v == 0 or v >= 16, "0 or an integer >= 16"),
    )
    start_epoch: int = _opt(0, "the epoch (counted from 0, as FFCV) where the ramp starts", check=NON_NEGATIVE)
    end_epoch: int = _opt(0, "the epoch from which the train size is data.image_size", check=NON_NEGATIVE)
    multiple: int = _opt(32, "sizes on the ramp are rounded to a multiple of this", check=POSITIVE)


@dataclass
class EvalConfig:
    flip_tta: bool = _opt(False, "evaluate on the mean of the logits of each image and its mirror image")


@dataclass
class BatchConfig:
    per_worker: int = _opt(256, "largest micro-batch a worker runs at once", check=POSITIVE)
    global_size: int = _opt(
        0,
        "images per optimizer step over all workers; 0 is per_worker x max workers. "
        "Kept fixed across resizes by gradient accumulation",
        check=NON_NEGATIVE,
    )


@dataclass
class OptimConfig:
    lr_per_256: float = _opt(0.256, "peak LR per 256 images of global batch (scaled linearly)", check=POSITIVE)
    momentum: float = _opt(0.875, "SGD momentum", check=FRACTION)
    nesterov: bool = _opt(False, "Nesterov momentum")
    weight_decay: float = _opt(3.0517578125e-05, "L2 weight decay (1/32768)", check=NON_NEGATIVE)
    bn_bias_decay: bool = _opt(False, "also decay BN parameters and biases (NVIDIA: off)")
    label_smoothing: float = _opt(0.1, "label smoothing of the cross-entropy", check=FRACTION)
    mixup_alpha: float = _opt(0.0, "mixup Beta(alpha, alpha); 0 is off (NVIDIA: 0.2 at 250 epochs)", check=NON_NEGATIVE)
    ema_decay: float = _opt(0.0, "EMA of the weights per optimizer step; 0 is off", check=FRACTION)
    impl: str = _opt(
        "auto",
        "SGD kernel: auto (fused; under amp-fp16's loss scaler foreach on CUDA, for-loop on CPU)",
        choices=("auto", "fused", "foreach", "for-loop"),
    )


@dataclass
class ScheduleConfig:
    kind: str = _opt(
        "cosine",
        "LR after warmup; triangular rises linearly from 1e-4 x peak to the peak at peak_epoch, then falls linearly (FFCV)",
        choices=SCHEDULES,
    )
    epochs: int = _opt(90, "length of the run and of the schedule", check=POSITIVE)
    warmup_epochs: float = _opt(8.0, "per-iteration linear warmup, in epochs (0 with triangular)", check=NON_NEGATIVE)
    peak_epoch: float = _opt(2.0, "triangular: the epoch at which the LR peaks", check=POSITIVE)
    end_lr: float = _opt(0.0, "final LR of cosine, linear and triangular", check=NON_NEGATIVE)
    milestones: list[int] = _opt([30, 60, 80], "epochs at which the step schedule multiplies by gamma")
    gamma: float = _opt(0.1, "step schedule factor", check=POSITIVE)


@dataclass
class SystemConfig:
    precision: str = _opt("auto", "auto is amp-bf16 (or amp-fp16) on CUDA, fp32 on CPU", choices=PRECISIONS)
    loss_scale: float = _opt(128.0, "initial dynamic loss scale under amp-fp16 (NVIDIA: 128)", check=POSITIVE)
    compile: bool = _opt(False, "torch.compile the model")
    cudnn_benchmark: bool = _opt(True, "let cuDNN pick the fastest kernels")
    seed: int = _opt(0, "seed of the weights, the data order and the augmentations")


@dataclass
class ScaleConfig:
    workers: str = _opt(
        "2",
        "Ray Train workers: N, or MIN:MAX for an elastic run",
        check=(lambda v: _parse_workers(v) is not None, "N or MIN:MAX with 1 <= MIN <= MAX"),
    )
    gpus_per_worker: float = _opt(0.0, "GPUs per worker; 0 trains on CPU with gloo", check=NON_NEGATIVE)
    cpus_per_worker: float = _opt(1.0, "CPUs reserved per worker", check=POSITIVE)
    max_failures: int = _opt(0, "worker-group failures to retry; -1 is unlimited", check=(lambda v: v >= -1, "an integer >= -1"))
    address: str = _opt("", "Ray address; empty starts a local Ray (or joins RAY_ADDRESS)")
    check_resources: bool = _opt(True, "fail fast when the cluster cannot place MIN workers (off for autoscalers)")
    resize_interval_s: float = _opt(60.0, "seconds between checks for room to grow an elastic run", check=NON_NEGATIVE)
    worker_resources: str = _opt(
        "",
        "extra Ray resources per worker, NAME=AMOUNT[,NAME=AMOUNT] (e.g. accelerator_type:H100=0.001)",
        check=(lambda v: parse_resources(v) is not None, "NAME=AMOUNT pairs separated by commas, amounts > 0"),
    )


@dataclass
class RunOptions:
    name: str = _opt("", "run name; empty derives one from the config, so the same command resumes")
    storage: str = _opt("./runs", "local path or pyarrow URI (s3://, gs://) for checkpoints and logs")
    log_every: int = _opt(20, "optimizer steps between progress lines", check=POSITIVE)
    checkpoint_every_steps: int = _opt(0, "also checkpoint every N optimizer steps; 0 is per epoch only", check=NON_NEGATIVE)
    keep_checkpoints: int = _opt(3, "newest checkpoints to keep", check=POSITIVE)
    stop_after_epochs: int = _opt(0, "stop (resumably) after this many epochs of this run; 0 runs to the end", check=NON_NEGATIVE)
    init_from: str = _opt("", "a checkpoint folder of another run to start from, with this config's hyperparameters (PBT)")


@dataclass
class TrackingConfig:
    uri: str = _opt("", "MLflow tracking URI; empty uses MLFLOW_TRACKING_URI, else a SQLite store under run.storage")
    mode: str = _opt(
        "required",
        "required: fail fast if the tracker is unreachable; optional: train anyway; off",
        choices=("required", "optional", "off"),
    )
    experiment: str = _opt("rn50-ray", "MLflow experiment name")
    register_model: str = _opt("", "register the final model under this name in the model registry")
    log_model: bool = _opt(True, "log the final model with mlflow.pytorch.log_model")
    log_checkpoint: bool = _opt(True, "upload the best checkpoint as an artifact")
    system_metrics: bool = _opt(True, "log CPU, memory (and GPU, with nvidia-ml-py) metrics")
    parent_run_id: str = _opt("", "nest this run under an MLflow parent run (set by `tune` for its trials)")


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
        return _parse_workers(self.scale.workers)[0]

    @property
    def max_workers(self) -> int:
        return _parse_workers(self.scale.workers)[1]


NOT_SHAPING = ("run.", "scale.", "tracking.", "data.loader_workers", "data.screen_images", "data.sample_log", "data.val_batch")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def parse_resources(value: str) -> dict[str, float] | None:
    """ "a=1,b=0.5" -> {"a": 1.0, "b": 0.5}; None when malformed."""
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in str(value).split(","))):
        name, sep, amount = item.rpartition("=")
        try:
            if not sep or not name or float(amount) <= 0:
                return None
            out[name] = float(amount)
        except ValueError:
            return None
    return out


def _parse_workers(value: str) -> tuple[int, int] | None:
    try:
        parts = [int(p) for p in str(value).split(":")]
    except ValueError:
        return None
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else tuple(parts) if len(parts) == 2 else (0, -1)
    return (lo, hi) if 1 <= lo <= hi else None


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
    """Fill what the defaults leave open: the global batch, the run name, absolute local paths."""
    batch = cfg.batch
    if not batch.global_size:
        batch = dataclasses.replace(batch, global_size=batch.per_worker * cfg.max_workers)
    data = dataclasses.replace(cfg.data, path=absolute(cfg.data.path) if cfg.data.path else "")
    run = cfg.run
    name = run.name or f"rn50-{cfg.data.backend}-{cfg.fingerprint()}"
    run = dataclasses.replace(run, name=name, storage=absolute(run.storage))
    return dataclasses.replace(cfg, data=data, batch=batch, run=run)


def is_remote(path: str) -> bool:
    """A URI (s3://, gs://, ...), not a local path."""
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute; a URI as it is."""
    return path if is_remote(path) else os.path.abspath(path)


def field_help() -> dict[str, str]:
    return {f"{s}.{k}": f.metadata.get("help", "") for s in SECTIONS for k, f in _section_fields(s).items()}
