"""The `dali-cpu` and `dali-gpu` backends: NVIDIA DALI pipelines, with DALI's functional API.

Train: file reader (sharded by world rank, padded so every rank has the same epoch length),
fused decode + random crop (area crop_area_min-1, aspect 3/4-4/3), resize, random flip and
normalize, written NCHW or NHWC (channels_last), in fp16 under AMP. Val: resize the shorter
side to image_size / val_crop_ratio, then center-crop. `dali-gpu` decodes with
device="mixed" (nvJPEG, and the A100/H100 hardware decoder with `hw_decoder_load`).

The reader is given the file list of `folder.scan_split`, so labels match the pytorch
backend exactly and files that are not images are never read. Imported only when chosen.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from rn50_ray.data import MEAN, STD
from rn50_ray.data.folder import Split
from rn50_ray.data.screen import bad_image_error, find_bad_images
from rn50_ray.errors import DataError

READER = "Reader"
# nvJPEG's buffers sized for full-size ImageNet images, as in NVIDIA's pipeline.
DEVICE_PADDING, HOST_PADDING = 211_025_920, 140_544_512


# How DALI names the file it failed on, where it does (a bad header gives only a codec status).
_FAILED_FILE = re.compile(r"(?:Failed to decode sample #\d+ : |File mapping failed: |Could not open file )(\S+)")


@contextlib.contextmanager
def _bad_file_errors(split: Split) -> Iterator[None]:
    """A failed pipeline as a DataError naming the file: DALI cannot skip a sample mid-batch,
    so a file that got past the driver's screen still ends the run, but with a clear message."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if "Critical error in pipeline" not in text:
            raise
        found = _FAILED_FILE.search(text)
        if found:
            raise DataError(f"{found.group(1)}: cannot decode image (DALI); remove it or pass --skip-bad-images") from None
        bad = find_bad_images(p for p, _ in split.samples)  # DALI did not say which: look (on failure only)
        if bad:
            raise bad_image_error(bad) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[-1]
        raise DataError(f"{split.root}: DALI could not decode an image that PIL decodes ({detail})") from None


def _normalize(images, mirror, *, size: int, fp16: bool, nhwc: bool):
    # A center just below 0.5 rounds a half-pixel margin down, as torchvision's CenterCrop does for
    # the short side; otherwise DALI's crop sits one pixel right of and below the pytorch backend's.
    return fn.crop_mirror_normalize(
        images,
        crop_pos_x=0.5 - 1e-6,
        crop_pos_y=0.5 - 1e-6,
        dtype=types.FLOAT16 if fp16 else types.FLOAT,
        output_layout="HWC" if nhwc else "CHW",
        crop=(size, size),
        mean=[m * 255 for m in MEAN],
        std=[s * 255 for s in STD],
        mirror=mirror,
    )


def _read(files, labels, *, shard_id, num_shards, train: bool):
    """The sharded file reader. Train shards are padded to equal length, so every rank runs the
    same number of steps; val is read once, in file order, without padding."""
    return fn.readers.file(
        files=files,
        labels=labels,
        random_shuffle=train,
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=train,
        name=READER,
    )


def _to_torch(batch, nhwc: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = batch[0]["images"]
    if nhwc:
        images = images.permute(0, 3, 1, 2)  # NHWC memory, NCHW shape: channels_last at no cost
    # Both copies non-blocking: a blocking one to a GPU waits for every step queued before it.
    labels = batch[0]["labels"].view(-1).to(device, non_blocking=True).long()
    return images.to(device, non_blocking=True), labels


@pipeline_def
def train_pipeline(files, labels, *, shard_id, num_shards, size, area_min, gpu, fp16, nhwc, hw_decoder_load):
    jpegs, label = _read(files, labels, shard_id=shard_id, num_shards=num_shards, train=True)
    decode_args = dict(output_type=types.RGB, random_area=[area_min, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=100)
    if gpu:
        images = fn.decoders.image_random_crop(
            jpegs,
            device="mixed",
            device_memory_padding=DEVICE_PADDING,
            host_memory_padding=HOST_PADDING,
            hw_decoder_load=hw_decoder_load,
            **decode_args,
        )
    else:
        images = fn.decoders.image_random_crop(jpegs, device="cpu", **decode_args)
    images = fn.resize(images, resize_x=size, resize_y=size, antialias=False)
    mirror = fn.random.coin_flip(probability=0.5)
    return _normalize(images, mirror, size=size, fp16=fp16, nhwc=nhwc), _labels_on(label, gpu)


@pipeline_def
def val_pipeline(files, labels, *, shard_id, num_shards, size, crop_ratio, gpu, fp16, nhwc):
    jpegs, label = _read(files, labels, shard_id=shard_id, num_shards=num_shards, train=False)
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
    images = fn.resize(images, resize_shorter=round(size / crop_ratio), antialias=False)
    return _normalize(images, 0, size=size, fp16=fp16, nhwc=nhwc), _labels_on(label, gpu)


def _labels_on(label, gpu: bool):
    """The reader's labels are on the CPU; a GPU pipeline hands them over on the GPU too, as DALI's
    examples do, so the step never waits on a host-to-device copy."""
    return label.gpu() if gpu else label


def _lists(split: Split) -> tuple[list[str], list[int]]:
    return [p for p, _ in split.samples], [label for _, label in split.samples]


class DaliTrain:
    """Exactly `steps_per_epoch` batches per epoch on every rank; the reader state travels in
    checkpoints, so a resume on the same world size continues with the exact next batches."""

    def __init__(
        self,
        split: Split,
        *,
        rank: int,
        world: int,
        per_rank: int,
        steps: int,
        size: int,
        area_min: float,
        device: torch.device,
        gpu: bool,
        fp16: bool,
        nhwc: bool,
        threads: int,
        seed: int,
        prefetch: int = 2,
        hw_decoder_load: float = 0.65,
    ):
        self.files, self.labels = _lists(split)
        self.prefetch = prefetch
        self.split = split
        self.kw = dict(
            shard_id=rank,
            num_shards=world,
            size=size,
            area_min=area_min,
            gpu=gpu,
            fp16=fp16,
            nhwc=nhwc,
            hw_decoder_load=hw_decoder_load,
        )
        self.per_rank, self.steps_per_epoch = per_rank, steps
        self.threads, self.seed, self.rank = threads, seed, rank
        self.device_id = device.index if gpu else None  # Ray's torch device, not ray.get_gpu_ids()
        self.device, self.nhwc = device, nhwc
        self.restored: bytes | None = None
        self.iterator: DALIGenericIterator | None = None

    def _build(self, epoch: int, checkpoint: bytes | None) -> None:
        pipe = train_pipeline(
            self.files,
            self.labels,
            batch_size=self.per_rank,
            num_threads=self.threads,
            device_id=self.device_id,
            seed=self.seed * 10_007 + epoch * 101 + self.rank,
            enable_checkpointing=True,
            checkpoint=checkpoint,
            prefetch_queue_depth=self.prefetch,
            **self.kw,
        )
        with _bad_file_errors(self.split):
            self.iterator = DALIGenericIterator(
                pipe, ["images", "labels"], reader_name=READER, last_batch_policy=LastBatchPolicy.DROP, auto_reset=True
            )

    def state(self) -> bytes | None:
        """Serialized reader and RNG state: where the next batch comes from."""
        return self.iterator.checkpoints()[0] if self.iterator is not None else None

    def load_state(self, state: bytes | None) -> None:
        self.restored = state

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.iterator is None:
            self._build(epoch, self.restored)
            self.restored = None
        todo = self.steps_per_epoch - start_step
        with _bad_file_errors(self.split):
            for i, batch in enumerate(self.iterator):
                if i >= todo:
                    continue  # drain: the padded shard may hold one batch more than the global plan
                yield _to_torch(batch, self.nhwc, self.device)


class DaliVal:
    def __init__(
        self,
        split: Split,
        *,
        rank: int,
        world: int,
        batch: int,
        size: int,
        crop_ratio: float,
        device: torch.device,
        gpu: bool,
        fp16: bool,
        nhwc: bool,
        threads: int,
        prefetch: int = 2,
    ):
        files, labels = _lists(split)
        pipe = val_pipeline(
            files,
            labels,
            batch_size=batch,
            num_threads=threads,
            prefetch_queue_depth=prefetch,
            device_id=device.index if gpu else None,
            shard_id=rank,
            num_shards=world,
            size=size,
            crop_ratio=crop_ratio,
            gpu=gpu,
            fp16=fp16,
            nhwc=nhwc,
            seed=0,
        )
        self.split, self.device, self.nhwc = split, device, nhwc
        with _bad_file_errors(self.split):
            self.iterator = DALIGenericIterator(
                pipe, ["images", "labels"], reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True
            )

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with _bad_file_errors(self.split):
            for batch in self.iterator:
                images, labels = _to_torch(batch, self.nhwc, self.device)
                yield images.float(), labels
