"""The config's sections: every key with its default, its help line and its check (choices, or a predicate and
what it expects). rn50_ray/config.py builds the one typed Config from them, merges files and overrides into
it, and checks what involves more than one key. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
        check=(lambda v: parse_workers(v) is not None, "N or MIN:MAX with 1 <= MIN <= MAX"),
    )
    gpus_per_worker: float = _opt(0.0, "GPUs per worker; 0 trains on CPU with gloo", check=NON_NEGATIVE)
    cpus_per_worker: float = _opt(1.0, "CPUs reserved per worker", check=POSITIVE)
    max_failures: int = _opt(
        10,
        "worker-group failures (a crashed worker, a lost node) to recover from, each from the last checkpoint; -1 is "
        "unlimited, 0 ends the run at the first. Preemptions with notice and bad input are not counted",
        check=(lambda v: v >= -1, "an integer >= -1"),
    )
    fault_tolerance: str = _opt(
        "restart",
        "restart: a lost worker restarts the worker group from the last checkpoint; replica: the others go on with "
        "every step (torchft), and the lost worker's replacement copies the live state from a peer",
        choices=("restart", "replica"),
    )
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
    storage_retry_s: float = _opt(
        600.0,
        "how long a stalled, throttling or unreachable store is waited for (retries with backoff) before the run stops, "
        "saying so; training waits meanwhile",
        check=POSITIVE,
    )


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


def parse_workers(value: str) -> tuple[int, int] | None:
    try:
        parts = [int(p) for p in str(value).split(":")]
    except ValueError:
        return None
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else tuple(parts) if len(parts) == 2 else (0, -1)
    return (lo, hi) if 1 <= lo <= hi else None
