"""The `dali-cpu` and `dali-gpu` backends: NVIDIA DALI pipelines, with DALI's functional API.

Train: DALI's native file reader (C++ threads, no Python per sample) reads this rank's images of the epoch in
the exact order `order` gives them, from the resume step on. Their crop windows and mirror flags are worked out
per batch, vectorised, from the manifest's image sizes (`order.random_resized_crops`), and fed beside the
reader as small arrays. DALI decodes only that window (`decoders.image_slice`, ROI decoding; `dali-gpu` decodes
with device="mixed", nvJPEG and the A100/H100 hardware decoder), resizes it to the epoch's size and
normalizes it, NCHW or NHWC (channels_last), in fp16 under AMP. One pipeline reads the epochs that fit in its
file list (ImageNet: one per pipeline, built in about a second; the sample: the whole run), and the train size
is one of its inputs, so a progressive-resizing step needs no rebuild. Val: the same reader, sharded, resize the shorter side to
size / val_crop_ratio, then a center crop. EXIF orientation is applied nowhere (as in the pytorch backend):
crops are in the stored pixels' frame. Imported only when chosen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from rn50_ray.core.context import Batch, Loaders
from rn50_ray.core.run_plan import RunPlan
from rn50_ray.data import order
from rn50_ray.data.audit import SampleLog
from rn50_ray.data.screen import bad_image_error, inspect
from rn50_ray.data.types import MEAN, STD, Shard, Split
from rn50_ray.errors import DataError

READER = "Reader"
# nvJPEG's buffers sized for full-size ImageNet images, as in NVIDIA's pipeline.
DEVICE_PADDING, HOST_PADDING = 211_025_920, 140_544_512

# How DALI names the file it failed on, where it does (a bad header gives only a codec status).
_FAILED_FILE = re.compile(r"(?:Failed to decode sample #\d+ : |File mapping failed: |Could not open file )(\S+)")


@contextlib.contextmanager
def _bad_file_errors(split: Split) -> Iterator[None]:
    """A failed pipeline as a DataError naming the file: DALI cannot skip a sample mid-batch, so a file that
    changed after the manifest was written still ends the run, but with a clear message."""
    try:
        yield
    except Exception as e:  # DALI raises a plain Exception (RuntimeError) with its C++ context in the text
        text = str(e)
        if "Critical error in pipeline" not in text:
            raise
        found = _FAILED_FILE.search(text)
        if found and "File mapping failed" in found.group(0):
            raise DataError(
                f"{found.group(1)}: missing or unreadable, but listed in the data folder's manifest (deleted since?); "
                f"rerun the command, which rescans the changed folder"
            ) from None
        if found:
            raise DataError(f"{found.group(1)}: cannot decode image (DALI); remove it or pass --skip-bad-images") from None
        bad = {split.file(i): why for i in range(len(split)) if (why := inspect(split.file(i)).problem)}  # on failure only
        if bad:
            raise bad_image_error(bad) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[-1]
        raise DataError(
            f"{split.root}: DALI could not decode an image ({detail}); if files were rewritten, rerun with --rescan"
        ) from None


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


# The reader's file list spans as many epochs as fit in this many files (at least one): ImageNet's epoch per rank
# is one pipeline; a small set's whole run is, so a short epoch does not pay a pipeline build.
WINDOW_FILES = 262_144


class CropFeed:
    """The external source beside the reader: batch b's crop windows, flips, train size and image indices, from
    the manifest's sizes. The reader reads its file list in order, so sample k of batch b is image
    indices[b * batch + k], of epoch epochs[b]. Prefetching runs past the list's end, where the reader starts
    it again: batch b is then batch b mod the list's, whose windows fit those images (a window that does not fit
    fails the prefetch, and DALI crashes shutting down a pipeline that holds such a failure)."""

    def __init__(self, split: Split, indices: np.ndarray, epochs: np.ndarray, batch: int, *, seed: int, area_min: float,
                 size_at: Callable[[int], int]):  # fmt: skip
        self.split, self.indices, self.epochs, self.batch = split, indices, epochs, batch
        self.seed, self.area_min, self.size_at = seed, area_min, size_at

    def __call__(self, iteration: int) -> tuple[np.ndarray, ...]:
        b = iteration % len(self.epochs)
        epoch, idx = int(self.epochs[b]), self.indices[b * self.batch : (b + 1) * self.batch]
        c = order.random_resized_crops(self.seed, epoch, idx, self.split.widths[idx], self.split.heights[idx], self.area_min)
        return (
            np.stack([c.left, c.top], axis=1).astype(np.float32),
            np.stack([c.width, c.height], axis=1).astype(np.float32),
            c.flip.astype(np.int32),
            np.full(len(idx), self.size_at(epoch), np.float32),
            idx.astype(np.int64),
        )


@pipeline_def
def train_pipeline(files, labels, feed: CropFeed, *, root: str, gpu: bool, fp16: bool, nhwc: bool, hw_decoder_load: float):
    jpegs, label = fn.readers.file(file_root=root, files=files, labels=labels, random_shuffle=False, name=READER)
    anchor, shape, mirror, size, index = fn.external_source(source=feed, num_outputs=5, batch=True)
    decode = dict(normalized_anchor=False, normalized_shape=False, output_type=types.RGB, adjust_orientation=False)
    if gpu:
        decode.update(device_memory_padding=DEVICE_PADDING, host_memory_padding=HOST_PADDING, hw_decoder_load=hw_decoder_load)
    images = fn.decoders.image_slice(jpegs, anchor, shape, device="mixed" if gpu else "cpu", **decode)
    images = fn.resize(images, resize_x=size, resize_y=size, antialias=False)  # the size an input: a ramp needs no rebuild
    return _normalize(images, mirror, fp16=fp16, nhwc=nhwc), _labels_on(label, gpu), index


@pipeline_def
def val_pipeline(files, labels, *, root, shard_id, num_shards, size, crop_ratio, gpu, fp16, nhwc):
    jpegs, label = fn.readers.file(
        file_root=root, files=files, labels=labels, shard_id=shard_id, num_shards=num_shards, name=READER
    )
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False)
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
    """`steps_per_epoch` batches per epoch, each this rank's share of the step. One pipeline reads a window of
    epochs (from the resume step on) and follows on epoch after epoch; asked for anything else (a restart, a
    bench), it is built again for that epoch and step."""

    def __init__(self, split: Split, shard: Shard, plan: RunPlan, *, seed: int, area_min: float, gpu: bool, fp16: bool,
                 nhwc: bool, threads: int, prefetch: int, log: SampleLog | None, hw_decoder_load: float = 0.65):  # fmt: skip
        self.split, self.shard, self.plan, self.log = split, shard, plan, log
        self.steps_per_epoch, self.seed, self.area_min = plan.steps_per_epoch, seed, area_min
        self.kw = dict(gpu=gpu, fp16=fp16, nhwc=nhwc, hw_decoder_load=hw_decoder_load)
        self.threads, self.prefetch = threads, prefetch
        self.device_id = shard.device.index if gpu else None  # Ray's torch device, not ray.get_gpu_ids()
        self.skipped = 0  # DALI cannot skip: the driver leaves unusable files out before training
        self.iterator: DALIGenericIterator | None = None
        self.next_epoch: int | None = None  # the epoch the pipeline delivers next from its step 0
        self.window_end = 0  # the first epoch past the pipeline's file list

    def _build(self, epoch: int, start_step: int) -> None:
        self.iterator = None  # the old pipeline goes before the next is built
        batch, rank = self.plan.batch, self.shard.rank
        per_epoch = max(self.steps_per_epoch * batch.share(rank), 1)
        self.window_end = max(min(self.plan.epochs, epoch + WINDOW_FILES // per_epoch), epoch + 1)
        parts, epochs = [], []
        for e in range(epoch, self.window_end):
            first = start_step if e == epoch else 0
            parts.append(
                order.rank_indices(order.epoch_order(len(self.split), self.seed, e), batch, rank, first, self.steps_per_epoch)
            )
            epochs.append(np.full(self.steps_per_epoch - first, e))
        indices, batch_epochs = np.concatenate(parts), np.concatenate(epochs)
        feed = CropFeed(self.split, indices, batch_epochs, batch.share(rank), seed=self.seed, area_min=self.area_min,
                        size_at=self.plan.sizes.at)  # fmt: skip
        pipe = train_pipeline(
            self.split.paths[indices].tolist(),
            self.split.labels[indices].tolist(),
            feed,
            root=self.split.data_root,
            batch_size=batch.share(rank),
            num_threads=self.threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
            **self.kw,
        )
        with _bad_file_errors(self.split):  # no reader_name: this class counts each epoch's batches itself
            self.iterator = DALIGenericIterator(pipe, ["images", "labels", "index"], size=-1)

    def set_share(self, plan: RunPlan, rank: int) -> None:
        if (plan.world_size, rank) != (self.plan.world_size, self.shard.rank):
            self.plan, self.shard = plan, dataclasses.replace(self.shard, rank=rank, world_size=plan.world_size)
            self.iterator = None  # the next epoch call builds a pipeline for the new share
            if self.log:
                self.log.rank, self.log.world_size = rank, plan.world_size

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if start_step >= self.steps_per_epoch:
            return
        if self.iterator is None or (epoch, start_step) != (self.next_epoch, 0):
            self._build(epoch, start_step)
        self.next_epoch = None  # until this epoch is read to its end
        with _bad_file_errors(self.split):
            for step in range(start_step, self.steps_per_epoch):
                (data,) = next(self.iterator)
                if self.log:
                    self.log.write(epoch, step, data["index"].view(-1).tolist())
                yield _to_torch(data, self.kw["nhwc"], self.shard.device)
        self.next_epoch = epoch + 1 if epoch + 1 < self.window_end else None


class DaliVal:
    def __init__(self, split: Split, shard: Shard, plan: RunPlan, *, crop_ratio: float, gpu: bool, fp16: bool, nhwc: bool,
                 threads: int, prefetch: int):  # fmt: skip
        self.split, self.device, self.nhwc, self.share = split, shard.device, nhwc, (shard.rank, shard.world_size)
        self.kw = dict(
            root=split.data_root, batch_size=plan.val_batch, num_threads=threads, prefetch_queue_depth=prefetch,
            device_id=shard.device.index if gpu else None, size=plan.val_size, crop_ratio=crop_ratio, gpu=gpu, fp16=fp16,
            nhwc=nhwc, seed=0,
        )  # fmt: skip
        self._build()

    def _build(self) -> None:
        self.iterator = None  # the old pipeline goes before the next is built
        rank, world_size = self.share
        pipe = val_pipeline(
            self.split.paths.tolist(), self.split.labels.tolist(), shard_id=rank, num_shards=world_size, **self.kw
        )
        with _bad_file_errors(self.split):
            self.iterator = DALIGenericIterator(
                pipe, ["images", "labels"], reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True
            )

    def set_share(self, rank: int, world_size: int) -> None:
        if (rank, world_size) != self.share:
            self.share = (rank, world_size)
            self._build()

    def batches(self) -> Iterator[Batch]:
        with _bad_file_errors(self.split):
            for (data,) in self.iterator:
                images, labels = _to_torch(data, self.nhwc, self.device)
                if len(labels):  # shards of unequal length: the iterator pads the short ones' last batch to nothing
                    yield images.float(), labels


def _options(data_cfg, gpu: bool, fp16_input: bool, channels_last: bool) -> dict:
    return dict(gpu=gpu, fp16=fp16_input, nhwc=channels_last, threads=max(data_cfg.loader_workers, 1), prefetch=data_cfg.prefetch)


def make_dali_val(
    data_cfg, shard: Shard, plan: RunPlan, val: Split, *, gpu: bool, fp16_input: bool, channels_last: bool
) -> DaliVal:
    return DaliVal(val, shard, plan, crop_ratio=data_cfg.val_crop_ratio, **_options(data_cfg, gpu, fp16_input, channels_last))


def make_dali_loaders(
    data_cfg,
    shard: Shard,
    plan: RunPlan,
    train: Split,
    val: Split,
    *,
    gpu: bool,
    seed: int,
    channels_last: bool,
    fp16_input: bool,
    log: SampleLog | None,
) -> Loaders:
    options = _options(data_cfg, gpu, fp16_input, channels_last)
    train_batches = DaliTrain(train, shard, plan, seed=seed, area_min=data_cfg.crop_area_min, log=log, **options)
    val_batches = make_dali_val(data_cfg, shard, plan, val, gpu=gpu, fp16_input=fp16_input, channels_last=channels_last)
    return Loaders(train_batches, val_batches, len(train.classes), len(train), len(val))
