"""The folder checks, the pytorch backend and prepare-sample, on real JPEG files."""

import shutil

import pytest
import torch
from PIL import Image

from rn50_ray.config import DataConfig
from rn50_ray.core.batching import plan_batches
from rn50_ray.data import order
from rn50_ray.data.folder import check_dataset
from rn50_ray.data.loaders import make_loaders
from rn50_ray.data.pytorch import decode_rgb
from rn50_ray.data.sample import prepare_sample
from rn50_ray.data.types import Shard
from rn50_ray.errors import DataError


def test_sample_layout(sample_data):
    train, val = check_dataset(sample_data)
    assert len(train.classes) == 10 and train.classes == val.classes
    assert (len(train), len(val)) == (1000, 200)
    img = Image.open(train.samples[0][0])
    assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"


def test_prepare_sample_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        prepare_sample(tmp_path / "out", source=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()


def test_missing_and_mismatched_folders(tiny_data, copy_of, tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        check_dataset(tmp_path / "nope")
    data = copy_of(tiny_data)
    shutil.rmtree(data / "val")
    with pytest.raises(DataError, match=r"val: missing; expected val/<class>/<image>"):
        check_dataset(data)
    shutil.copytree(data / "train", data / "val")
    shutil.rmtree(data / "val" / "bag")
    with pytest.raises(DataError, match=r"different classes \(only in train: \['bag'\]"):
        check_dataset(data)
    (data / "val" / "bag").mkdir()
    with pytest.raises(DataError, match=r"val/bag: class folder has no images"):
        check_dataset(data)


def test_non_image_files_are_ignored_and_counted(tiny_data, copy_of):
    data = copy_of(tiny_data)
    (data / "train" / "bag" / "README.txt").write_text("not an image")
    train, _ = check_dataset(data)
    assert train.ignored == 1 and len(train) == 200


def test_undecodable_image_names_the_file(tiny_data, copy_of):
    data = copy_of(tiny_data)
    bad = data / "train" / "bag" / "broken.JPEG"
    bad.write_bytes(b"this is text, not a JPEG")
    truncated = data / "train" / "coat" / "truncated.JPEG"
    truncated.write_bytes((data / "train" / "coat").glob("*.JPEG").__next__().read_bytes()[:200])
    for f in (bad, truncated):
        with pytest.raises(DataError, match=f"{f}: cannot decode image"):
            decode_rgb(str(f))


def test_grayscale_cmyk_and_png_decode_to_rgb(tmp_path):
    Image.new("L", (20, 10), 128).save(tmp_path / "g.jpg")
    Image.new("CMYK", (20, 10), (0, 255, 0, 0)).save(tmp_path / "c.jpg")
    Image.new("RGBA", (20, 10), (1, 2, 3, 4)).save(tmp_path / "p.png")
    for name in ("g.jpg", "c.jpg", "p.png"):
        assert decode_rgb(str(tmp_path / name)).mode == "RGB"


def _loader(data, *, rank=0, world=1, global_batch=20, per_worker=20, skip=False, size=32, backend="pytorch", val_batch=0):
    cfg = DataConfig(path=str(data), backend=backend, image_size=size, loader_workers=0 if backend == "pytorch" else 1,
                     skip_bad_images=skip, val_batch=val_batch)  # fmt: skip
    plan = plan_batches(global_batch, world, per_worker)
    return make_loaders(cfg, Shard(rank, world, torch.device("cpu")), plan, seed=0, channels_last=False)


def test_skip_bad_images_counts_them(tiny_data, copy_of):
    data = copy_of(tiny_data)
    (data / "train" / "bag" / "broken.JPEG").write_bytes(b"junk")
    loaders = _loader(data, global_batch=67, per_worker=67, skip=True)  # 201 images: 3 steps cover all
    n = sum(len(y) for _, y in loaders.train.epoch(0))
    assert loaders.train.skipped == 1 and n == 200
    with pytest.raises(DataError, match=r"broken\.JPEG: cannot decode image"):
        list(_loader(data, global_batch=67, per_worker=67).train.epoch(0))


def test_batches_are_normalized_float_on_device(tiny_data):
    x, y = next(iter(_loader(tiny_data).train.epoch(0)))
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -3 < x.mean().item() < 3 and x.std().item() > 0.2


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_steps_hold_the_same_images_at_any_world_size(world):
    # 103 images, a global batch of 8: at W = 3, 5 (which do not divide 8) the shares differ by one image.
    n, plan, steps = 103, plan_batches(8, world, 8), 103 // 8
    perm = order.epoch_order(n, seed=3, epoch=2)
    slices = [[order.step_indices(perm, plan, r, t).tolist() for r in range(world)] for t in range(steps)]
    for t, ranks in enumerate(slices):
        assert [i for r in ranks for i in r] == perm[t * 8 : (t + 1) * 8].tolist()  # step t is the same 8 images
        assert [len(r) for r in ranks] == [plan.share(r) for r in range(world)]
    trained = [i for ranks in slices for r in ranks for i in r]
    assert len(set(trained)) == len(trained) == steps * 8  # an epoch trains each image at most once
    assert not (order.epoch_order(n, 3, 2) == order.epoch_order(n, 3, 3)).all()  # a new order every epoch


def test_random_resized_crops_are_torchvisions_and_depend_on_the_image_alone():
    crops = [order.random_resized_crop(7, 1, i, 500, 375, 0.08) for i in range(2000)]
    assert crops[5] == order.random_resized_crop(7, 1, 5, 500, 375, 0.08)  # a function of (seed, epoch, index)
    assert crops[5] != order.random_resized_crop(7, 2, 5, 500, 375, 0.08)
    for c in crops:
        assert 0 <= c.left and c.left + c.width <= 500 and 0 <= c.top and c.top + c.height <= 375
    inside = [c for c in crops if (c.width, c.height) != (500, 375)]
    area = [c.width * c.height / (500 * 375) for c in inside]
    aspect = [c.width / c.height for c in inside]
    assert min(area) >= 0.079 and max(area) <= 1.0 and min(area) < 0.15 and max(area) > 0.9  # torchvision's (0.08, 1)
    assert min(aspect) > 3 / 4 - 0.02 and max(aspect) < 4 / 3 + 0.02  # and (3/4, 4/3), up to rounding
    assert 0.45 < sum(c.flip for c in crops) / len(crops) < 0.55
    tall = order.random_resized_crop(0, 0, 0, 10, 400, 0.99)  # no window fits: torchvision's centre-crop fallback
    assert (tall.width, tall.height, tall.top) == (10, 13, (400 - 13) // 2)


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu"])
def test_each_rank_trains_its_slice_of_the_same_global_step(tiny_data, backend):
    # 200 images, a global batch of 25 over 3 ranks (9 + 8 + 8): the labels of every step, rank after rank,
    # are those of the one-rank run, and a rank's batches are capped by per_worker through accumulation.
    one = [y.tolist() for _, y in _loader(tiny_data, global_batch=25, per_worker=25, backend=backend).train.epoch(0)]
    ranks = [_loader(tiny_data, rank=r, world=3, global_batch=25, per_worker=4, backend=backend) for r in range(3)]
    per_rank = [[y.tolist() for _, y in loaders.train.epoch(0)] for loaders in ranks]
    assert [len(b) for b in per_rank] == [8, 8, 8] and [len(per_rank[r][0]) for r in range(3)] == [9, 8, 8]
    assert [[y for r in range(3) for y in per_rank[r][t]] for t in range(8)] == one
    resumed = [y.tolist() for _, y in ranks[1].train.epoch(0, start_step=5)]  # mid-epoch: the remaining steps
    assert resumed == per_rank[1][5:]


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu", "synthetic"])
def test_validation_batches_are_capped_at_a_training_micro_batch(tiny_data, backend):
    # One worker with a global batch of 50 trains in micro-batches of 10; validation must not pass 50 at once.
    loaders = _loader(tiny_data, global_batch=50, per_worker=10, backend=backend)
    assert max(len(y) for _, y in loaders.val.batches()) == 10
    assert max(len(y) for _, y in _loader(tiny_data, global_batch=50, per_worker=10, backend=backend, val_batch=7)
               .val.batches()) == 7  # fmt: skip
