"""The `dali-cpu` and `dali-gpu` backends: NVIDIA DALI pipelines, with DALI's functional API.

Train: a parallel external source (`dali_source.TrainSource`, in DALI's own reader processes) hands over
each step's images as bytes, with the crop window and mirror flag that `order` gives them; DALI decodes only
that window (`decoders.image_slice`, ROI decoding; `dali-gpu` decodes with device="mixed", nvJPEG and the
A100/H100 hardware decoder), resizes it to the epoch's train size and normalizes it, NCHW or NHWC
(channels_last), in fp16 under AMP. The size is an input of the pipeline, so a progressive-resizing schedule
needs no rebuild. Val: the sharded file reader, resize the shorter side to size / val_crop_ratio, then a
center crop. Imported only when chosen.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from rn50_ray.core.batching import BatchPlan
from rn50_ray.data.audit import SampleLog
from rn50_ray.data.dali_source import TrainSource
from rn50_ray.data.folder import Split
from rn50_ray.data.screen import bad_image_error, find_bad_images
from rn50_ray.data.types import MEAN, STD, Batch, Loaders, Shard
from rn50_ray.errors import DataError

READER = "Reader"
# nvJPEG's buffers sized for full-size ImageNet images, as in NVIDIA's pipeline.
DEVICE_PADDING, HOST_PADDING = 211_025_920, 140_544_512

# How DALI or the source names the file it failed on, where it does (a bad header gives only a codec status).
_FAILED_FILE = re.compile(r"(?:Failed to decode sample #\d+ : |File mapping failed: |Could not open file )(\S+)")
_SOURCE_FILE = re.compile(r"ValueError: (\S+): cannot decode image")


@contextlib.contextmanager
def _bad_file_errors(split: Split) -> Iterator[None]:
    """A failed pipeline as a DataError naming the file: DALI cannot skip a sample mid-batch,
    so a file that got past the driver's screen still ends the run, but with a clear message."""
    try:
        yield
    except Exception as e:  # DALI re-raises a reader process's error as a plain Exception with its traceback
        text = str(e)
        if "Critical error in pipeline" not in text and "cannot decode image" not in text:
            raise
        found = _FAILED_FILE.search(text) or _SOURCE_FILE.search(text)
        if found:
            raise DataError(f"{found.group(1)}: cannot decode image (DALI); remove it or pass --skip-bad-images") from None
        bad = find_bad_images((p for p, _ in split.samples), dali=True)  # DALI did not say which: look (on failure only)
        if bad:
            raise bad_image_error(bad) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[-1]
        raise DataError(f"{split.root}: DALI could not decode an image that PIL decodes ({detail})") from None


def _normalize(images, mirror, *, fp16: bool, nhwc: bool, crop: int | None = None):
    # A center just below 0.5 rounds a half-pixel margin down, as torchvision's CenterCrop does for
    # the short side; otherwise DALI's crop sits one pixel right of and below the pytorch backend's.
    return fn.crop_mirror_normalize(
        images,
        crop_pos_x=0.5 - 1e-6,
        crop_pos_y=0.5 - 1e-6,
        dtype=types.FLOAT16 if fp16 else types.FLOAT,
        output_layout="HWC" if nhwc else "CHW",
        crop=(crop, crop) if crop else None,
        mean=[m * 255 for m in MEAN],
        std=[s * 255 for s in STD],
        mirror=mirror,
    )


def _labels_on(label, gpu: bool):
    """Labels come from the CPU; a GPU pipeline hands them over on the GPU too, as DALI's examples do,
    so the step never waits on a host-to-device copy."""
    return label.gpu() if gpu else label


@pipeline_def
def train_pipeline(source: TrainSource, *, gpu: bool, fp16: bool, nhwc: bool, hw_decoder_load: float):
    jpegs, label, anchor, shape, mirror, size, index = fn.external_source(
        source=source, num_outputs=7, batch=False, parallel=True
    )
    # EXIF orientation is left alone, as PIL (and so the pytorch backend and the crop windows) leave it.
    decode = dict(normalized_anchor=False, normalized_shape=False, output_type=types.RGB, adjust_orientation=False)
    if gpu:
        decode.update(device_memory_padding=DEVICE_PADDING, host_memory_padding=HOST_PADDING, hw_decoder_load=hw_decoder_load)
    images = fn.decoders.image_slice(jpegs, anchor, shape, device="mixed" if gpu else "cpu", **decode)
    images = fn.resize(images, resize_x=size, resize_y=size, antialias=False)
    return _normalize(images, mirror, fp16=fp16, nhwc=nhwc), _labels_on(label, gpu), index


@pipeline_def
def val_pipeline(files, labels, *, shard_id, num_shards, size, crop_ratio, gpu, fp16, nhwc):
    jpegs, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards, name=READER)
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
    images = fn.resize(images, resize_shorter=round(size / crop_ratio), antialias=False)
    return _normalize(images, 0, fp16=fp16, nhwc=nhwc, crop=size), _labels_on(label, gpu)


def _to_torch(data: dict, nhwc: bool, device: torch.device) -> Batch:
    images = data["images"]
    if nhwc:
        images = images.permute(0, 3, 1, 2)  # NHWC memory, NCHW shape: channels_last at no cost
    # Both copies non-blocking: a blocking one to a GPU waits for every step queued before it.
    labels = data["labels"].view(-1).to(device, non_blocking=True).long()
    return images.to(device, non_blocking=True), labels


class DaliTrain:
    """`steps_per_epoch` batches per epoch, each this rank's share of the step. The pipeline is built at the
    first epoch asked for and follows on epoch after epoch; asked for anything else, it is built again."""

    def __init__(self, split: Split, shard: Shard, plan: BatchPlan, *, steps: int, seed: int, area_min: float,
                 size_at: Callable[[int], int], gpu: bool, fp16: bool, nhwc: bool, threads: int, prefetch: int,
                 log: SampleLog | None, hw_decoder_load: float = 0.65):  # fmt: skip
        self.split, self.shard, self.plan, self.log = split, shard, plan, log
        self.steps_per_epoch, self.seed, self.area_min, self.size_at = steps, seed, area_min, size_at
        self.kw = dict(gpu=gpu, fp16=fp16, nhwc=nhwc, hw_decoder_load=hw_decoder_load)
        self.threads, self.prefetch = threads, prefetch
        self.device_id = shard.device.index if gpu else None  # Ray's torch device, not ray.get_gpu_ids()
        self.iterator: DALIGenericIterator | None = None
        self.next_epoch: int | None = None  # the epoch the pipeline delivers next from its step 0
        self.skipped = 0  # DALI cannot skip: the driver's screen leaves bad files out before training

    def _build(self, epoch: int, start_step: int) -> None:
        source = TrainSource(
            [p for p, _ in self.split.samples],
            [label for _, label in self.split.samples],
            self.plan,
            self.shard.rank,
            steps=self.steps_per_epoch,
            seed=self.seed,
            area_min=self.area_min,
            size_at=self.size_at,
            first_epoch=epoch,
            first_step=start_step,
        )
        pipe = train_pipeline(
            source,
            batch_size=self.plan.share(self.shard.rank),
            num_threads=self.threads,
            device_id=self.device_id,
            py_num_workers=self.threads,
            py_start_method="spawn",  # CUDA is up in a Ray GPU worker: fork is unsafe there
            prefetch_queue_depth=self.prefetch,
            **self.kw,
        )
        with _bad_file_errors(self.split):
            self.iterator = DALIGenericIterator(pipe, ["images", "labels", "index"], auto_reset=True)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if self.iterator is None or (epoch, start_step) != (self.next_epoch, 0):
            self._build(epoch, start_step)
        self.next_epoch = None  # until this epoch is read to its end
        step = start_step
        with _bad_file_errors(self.split):
            for (data,) in self.iterator:
                if self.log:
                    self.log.write(epoch, step, data["index"].view(-1).tolist())
                step += 1
                yield _to_torch(data, self.kw["nhwc"], self.shard.device)
        self.next_epoch = epoch + 1


class DaliVal:
    def __init__(self, split: Split, shard: Shard, *, batch: int, size: int, crop_ratio: float, gpu: bool, fp16: bool,
                 nhwc: bool, threads: int, prefetch: int):  # fmt: skip
        pipe = val_pipeline(
            [p for p, _ in split.samples],
            [label for _, label in split.samples],
            batch_size=batch,
            num_threads=threads,
            prefetch_queue_depth=prefetch,
            device_id=shard.device.index if gpu else None,
            shard_id=shard.rank,
            num_shards=shard.world_size,
            size=size,
            crop_ratio=crop_ratio,
            gpu=gpu,
            fp16=fp16,
            nhwc=nhwc,
            seed=0,
        )
        self.split, self.device, self.nhwc = split, shard.device, nhwc
        with _bad_file_errors(self.split):
            self.iterator = DALIGenericIterator(
                pipe, ["images", "labels"], reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True
            )

    def batches(self) -> Iterator[Batch]:
        with _bad_file_errors(self.split):
            for (data,) in self.iterator:
                images, labels = _to_torch(data, self.nhwc, self.device)
                if len(labels):  # shards of unequal length: the iterator pads the short ones' last batch to nothing
                    yield images.float(), labels


def make_dali_loaders(
    data_cfg,
    shard: Shard,
    plan: BatchPlan,
    train: Split,
    val: Split,
    *,
    gpu: bool,
    steps: int,
    seed: int,
    channels_last: bool,
    fp16_input: bool,
    val_batch: int,
    size_at: Callable[[int], int],
    val_size: int,
    log: SampleLog | None,
) -> Loaders:
    common = dict(
        gpu=gpu, fp16=fp16_input, nhwc=channels_last, threads=max(data_cfg.loader_workers, 1), prefetch=data_cfg.prefetch
    )
    train_batches = DaliTrain(
        train, shard, plan, steps=steps, seed=seed, area_min=data_cfg.crop_area_min, size_at=size_at, log=log, **common
    )
    val_batches = DaliVal(val, shard, batch=val_batch, size=val_size, crop_ratio=data_cfg.val_crop_ratio, **common)
    return Loaders(train_batches, val_batches, len(train.classes), len(train), len(val))
