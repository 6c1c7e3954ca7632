"""DALI CPU pipelines on real JPEGs: labels, val tensors, odd and broken files, and exact mid-epoch resume."""

import re
from collections import Counter

import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="needs nvidia-dali-cuda120 (in requirements.txt)")

from conftest import loaders_for

from rn50_ray.data.manifest import open_dataset
from rn50_ray.data.screen import bad_image_error
from rn50_ray.errors import DataError


def _loaders(data, backend, *, per_rank=20, rank=0, world=1, seed=0, skip=False, screen=True, **layout):
    return loaders_for(data, backend, rank=rank, world=world, global_batch=per_rank * world, per_worker=per_rank, seed=seed,
                       skip=skip, loader_workers=1, **{"data.screen_images": screen}, **layout)  # fmt: skip


def test_dali_cpu_is_the_default_where_dali_is_installed(tiny_data):
    assert _loaders(tiny_data, "auto").notes[0].startswith("data: dali-cpu backend")


def test_train_batches_and_labels_match_the_pytorch_backend(tiny_data):
    dali, torch_ = _loaders(tiny_data, "dali-cpu"), _loaders(tiny_data, "pytorch")
    assert dali.train.steps_per_epoch == torch_.train.steps_per_epoch == 10
    batches = list(dali.train.epoch(0))
    assert len(batches) == 10
    x, y = batches[0]
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1.5 and 0.3 < x.std().item() < 2
    dali_labels = Counter(int(v) for _, y in batches for v in y)
    torch_labels = Counter(int(v) for _, y in torch_.train.epoch(0) for v in y)
    assert dali_labels == torch_labels == Counter({c: 20 for c in range(10)})  # one epoch holds every image once


def test_val_tensors_match_the_pytorch_backend(tiny_data):
    # Both read val in file order. JPEG decoders and resize kernels differ slightly (DALI without
    # antialiasing, PIL with; equal when upscaling), so the tolerance is 0.02 in normalized units on the
    # mean (about 1 grey level of 255) and 0.5 on any pixel.
    dali = torch.cat([x for x, _ in _loaders(tiny_data, "dali-cpu", per_rank=25).val.batches()])
    ref = torch.cat([x for x, _ in _loaders(tiny_data, "pytorch", per_rank=25).val.batches()])
    assert dali.shape == ref.shape == (50, 3, 32, 32)
    assert (dali - ref).abs().mean().item() < 0.02
    assert (dali - ref).abs().max().item() < 0.5
    dali_y = torch.cat([y for _, y in _loaders(tiny_data, "dali-cpu", per_rank=25).val.batches()])
    ref_y = torch.cat([y for _, y in _loaders(tiny_data, "pytorch", per_rank=25).val.batches()])
    assert torch.equal(dali_y, ref_y)


def test_val_shards_of_unequal_length_cover_the_split_once(tiny_data):
    # 50 val images over 3 ranks: 16, 17 and 17 (DALI's shard boundaries). DALI pads the short shard's last batch
    # to nothing, and an empty batch would crash the metrics: none is handed over.
    batches = [[y for _, y in _loaders(tiny_data, "dali-cpu", per_rank=8, rank=r, world=3).val.batches()] for r in range(3)]
    assert all(len(y) for rank in batches for y in rank)
    assert [sum(len(y) for y in rank) for rank in batches] == [16, 17, 17]
    got = sorted(torch.cat([y for rank in batches for y in rank]).tolist())
    assert got == sorted(open_dataset(str(tiny_data), str(tiny_data)).val.labels.tolist())


def test_fp16_nhwc_batches_as_a_gpu_step_under_amp_gets_them(tiny_data):
    # The GPU path's layout (half precision, channels_last) from the same pipeline, built here on the CPU.
    half = _loaders(tiny_data, "dali-cpu", per_rank=25, channels_last=True, fp16_input=True)
    full = _loaders(tiny_data, "dali-cpu", per_rank=25)
    train, _ = next(iter(half.train.epoch(0)))
    assert train.dtype == torch.float16 and train.shape == (25, 3, 32, 32)
    assert train.is_contiguous(memory_format=torch.channels_last) and not train.is_contiguous()
    # Val is handed to evaluation in fp32 either way; its values are the fp32 pipeline's, rounded to fp16.
    (x16, y16), (x32, y32) = next(iter(half.val.batches())), next(iter(full.val.batches()))
    assert x16.is_contiguous(memory_format=torch.channels_last) and torch.equal(y16, y32)
    assert torch.equal(x16, x16.half().float()) and not torch.equal(x32, x32.half().float())
    assert torch.allclose(x16, x32, rtol=1e-3, atol=1e-3)


def test_resume_mid_epoch_gives_the_exact_next_batches(tiny_data):
    # No reader state to save: step t's images and their crops are functions of (seed, epoch, t), so a
    # pipeline built to start at step 3 hands over exactly the batches an uninterrupted epoch does.
    full = list(_loaders(tiny_data, "dali-cpu").train.epoch(1))
    got = list(_loaders(tiny_data, "dali-cpu").train.epoch(1, start_step=3))
    assert len(full) == 10 and len(got) == 7
    for (xa, ya), (xb, yb) in zip(full[3:], got, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_one_pipeline_follows_on_epoch_after_epoch_and_another_is_built_when_asked_for_another(tiny_data):
    train = _loaders(tiny_data, "dali-cpu").train
    first = [y for _, y in train.epoch(0, start_step=8)]
    built = train.iterator
    second = [y for _, y in train.epoch(1)]
    assert len(first) == 2 and len(second) == 10 and train.iterator is built  # the native reader's list spans both
    again = [y for _, y in train.epoch(1)]  # epoch 1 again (a bench, a restart): built anew, the same batches
    assert train.iterator is not built and all(torch.equal(a, b) for a, b in zip(second, again, strict=True))
    assert not torch.equal(torch.cat([y for _, y in train.epoch(0)]), torch.cat(second))  # a new order every epoch


@pytest.fixture
def odd_data(tiny_data, copy_of):
    """The tiny sample plus every kind of odd file a real ImageNet folder holds, in train/ and val/."""
    data = copy_of(tiny_data)
    for split in ("train", "val"):
        folder = data / split / "bag"
        src = sorted(folder.glob("*.JPEG"))[0]
        img = Image.open(src).convert("RGB")
        img.convert("L").save(folder / "gray.JPEG")
        img.convert("CMYK").save(folder / "cmyk.JPEG")
        img.save(folder / "png_named_jpeg.JPEG", format="PNG")  # as ImageNet's n02105855_2933.JPEG
        img.save(folder / "real.png")
        (folder / "README.txt").write_text("not an image")
    return data


def _add_bad_files(folder):
    good = sorted(folder.glob("*.JPEG"))[0].read_bytes()
    bad = {
        "truncated.JPEG": good[: len(good) // 2],
        "garbage.JPEG": b"this is no image " * 20,
        "empty.JPEG": b"",
    }
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    return {str(folder / name) for name in bad}


def test_grayscale_cmyk_and_png_decode_to_rgb(odd_data):
    loaders = _loaders(odd_data, "dali-cpu", per_rank=27)
    assert loaders.val_size == 54 and "data: ignored 2 non-image files" in loaders.notes
    images = torch.cat([x for x, _ in loaders.val.batches()])
    ref = torch.cat([x for x, _ in _loaders(odd_data, "pytorch", per_rank=27).val.batches()])
    assert images.shape == ref.shape == (54, 3, 32, 32)
    assert (images - ref).abs().mean().item() < 0.02  # the same RGB pixels as PIL's conversion


def test_screen_names_every_undecodable_file_and_passes_the_rest(odd_data):
    bad = _add_bad_files(odd_data / "train" / "coat")
    dataset = open_dataset(str(odd_data), str(odd_data))
    found = {f"{odd_data}/{p}": why for p, why in dataset.unusable(dali=False).items()}
    assert set(found) == bad
    assert found[str(odd_data / "train/coat/empty.JPEG")] == "empty file"
    assert "truncated" in found[str(odd_data / "train/coat/truncated.JPEG")].lower()
    assert "cannot identify" in found[str(odd_data / "train/coat/garbage.JPEG")]
    message = str(bad_image_error(found))
    assert message.endswith("(2 more undecodable files); remove it or pass --skip-bad-images")


def test_skipped_files_are_left_out_and_counted(odd_data):
    _add_bad_files(odd_data / "train" / "coat")
    loaders = _loaders(odd_data, "dali-cpu", skip=True)
    assert loaders.excluded == 3 and "data: skipped 3 undecodable images (--skip-bad-images)" in loaders.notes
    assert loaders.train_size == 204  # 200 + 4 odd but decodable files
    assert sum(len(y) for _, y in loaders.train.epoch(0)) == 200  # 10 full steps, nothing died


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("name", ["truncated.JPEG", "garbage.JPEG", "empty.JPEG"])
def test_an_unscreened_bad_file_fails_with_an_error_naming_it(tiny_data, copy_of, name, split):
    data = copy_of(tiny_data)
    _add_bad_files(data / split / "bag")
    for other in {"truncated.JPEG", "garbage.JPEG", "empty.JPEG"} - {name}:
        (data / split / "bag" / other).unlink()
    with pytest.raises(DataError, match=re.escape(f"{data / split / 'bag' / name}: cannot decode image")):
        # without the screen (headers only), the truncated file reaches DALI; the others fail on their header
        loaders = _loaders(data, "dali-cpu", per_rank=67 if split == "train" else 5, screen=False)  # train: 3 steps of 67
        list(loaders.train.epoch(0) if split == "train" else loaders.val.batches())


@pytest.fixture
def exif_rotated(tmp_path):
    """Images 48 x 32 px, dark on the left and bright on the right as stored, each tagged with EXIF orientation 6
    (a viewer shows it turned a quarter: dark on top, 32 x 48)."""
    for split, n in (("train", 8), ("val", 4)):
        for cls in ("a", "b"):
            folder = tmp_path / "exif" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                img = Image.new("RGB", (48, 32), (20, 20, 20))
                img.paste((235, 235, 235), (24, 0, 48, 32))
                exif = Image.Exif()
                exif[0x0112] = 6  # Orientation: rotate 90 CW to display
                img.save(folder / f"{i}.JPEG", exif=exif.tobytes(), quality=95)
    return tmp_path / "exif"


def test_exif_orientation_is_left_alone_by_all_four_pipelines(exif_rotated):
    # One rule: the stored pixels, as torchvision's ImageFolder and the manifest's sizes (crop windows) have them.
    # Applied, the dark/bright split would run across (top and bottom) instead of along the width.
    for backend in ("pytorch", "dali-cpu"):
        loaders = _loaders(exif_rotated, backend, per_rank=16, **{"data.crop_area_min": 0.9})
        for name, images in (("train", next(iter(loaders.train.epoch(0)))[0]), ("val", next(iter(loaders.val.batches()))[0])):
            half = images.shape[-1] // 2
            across = (images[..., :half].mean((1, 2, 3)) - images[..., half:].mean((1, 2, 3))).abs()
            down = (images[..., :half, :].mean((1, 2, 3)) - images[..., half:, :].mean((1, 2, 3))).abs()
            assert (across > 1.0).all() and (down < 0.2).all(), (backend, name, across, down)
    dali, ref = (next(iter(_loaders(exif_rotated, b, per_rank=16).train.epoch(0)))[0] for b in ("dali-cpu", "pytorch"))
    assert (dali - ref).abs().mean() < 0.1  # the same windows, flips and frame in both backends
