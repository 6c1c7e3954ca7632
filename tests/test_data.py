"""The folder checks, the pytorch backend, the data order and crops, and prepare-sample, on real JPEG files."""

import shutil

import numpy as np
import pytest
from conftest import loaders_for
from PIL import Image

from rn50_ray.core.batching import BatchPlan
from rn50_ray.data import order
from rn50_ray.data.manifest import open_dataset
from rn50_ray.data.pytorch import decode_rgb
from rn50_ray.data.sample import prepare_sample
from rn50_ray.errors import DataError


def check_dataset(root):
    """The folder's train and val splits as the manifest lists them."""
    dataset = open_dataset(str(root), str(root), log=lambda line: None)
    return dataset.train, dataset.val


def test_sample_layout(sample_data):
    train, val = check_dataset(sample_data)
    assert len(train.classes) == 10 and train.classes == val.classes
    assert (len(train), len(val)) == (1000, 200)
    img = Image.open(train.file(0))
    assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
    assert (train.widths == 32).all() and (train.heights == 32).all()  # the manifest's sizes, from the headers


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
    return loaders_for(data, backend, rank=rank, world=world, global_batch=global_batch, per_worker=per_worker, skip=skip,
                       size=size, val_batch=val_batch)  # fmt: skip


def test_skip_bad_images_leaves_them_out_before_training_and_counts_them(tiny_data, copy_of):
    data = copy_of(tiny_data)
    (data / "train" / "bag" / "broken.JPEG").write_bytes(b"junk")
    loaders = _loader(data, global_batch=50, per_worker=50, skip=True)  # 200 good images: 4 steps cover all
    assert loaders.excluded == 1 and sum(len(y) for _, y in loaders.train.epoch(0)) == 200
    with pytest.raises(DataError, match=r"broken\.JPEG: cannot decode image"):
        _loader(data, global_batch=50, per_worker=50)


def test_an_image_rewritten_in_place_with_another_size_is_named_with_what_to_do(tiny_data, copy_of):
    data = copy_of(tiny_data)
    loaders = _loader(data, global_batch=200, per_worker=200)
    first = loaders.train.epoch(0)
    victim = next(iter(sorted((data / "train").rglob("*.JPEG"))))
    Image.new("RGB", (40, 30)).save(victim)  # same name: no folder changes, so the manifest is not rebuilt
    with pytest.raises(DataError, match=rf"{victim}: 40 x 30 px, but the data folder's manifest says 32 x 32 .*--rescan"):
        list(first)


def test_batches_are_normalized_float_on_device(tiny_data):
    import torch

    x, y = next(iter(_loader(tiny_data).train.epoch(0)))
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -3 < x.mean().item() < 3 and x.std().item() > 0.2


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_steps_hold_the_same_images_at_any_world_size(world):
    # 103 images, a global batch of 8: at W = 3, 5 (which do not divide 8) the shares differ by one image.
    n, plan, steps = 103, BatchPlan(8, world, 8), 103 // 8
    perm = order.epoch_order(n, seed=3, epoch=2)
    slices = [[order.step_indices(perm, plan, r, t).tolist() for r in range(world)] for t in range(steps)]
    for t, ranks in enumerate(slices):
        assert [i for r in ranks for i in r] == perm[t * 8 : (t + 1) * 8].tolist()  # step t is the same 8 images
        assert [len(r) for r in ranks] == [plan.share(r) for r in range(world)]
    trained = [i for ranks in slices for r in ranks for i in r]
    assert len(set(trained)) == len(trained) == steps * 8  # an epoch trains each image at most once
    assert not (order.epoch_order(n, 3, 2) == order.epoch_order(n, 3, 3)).all()  # a new order every epoch


def test_random_resized_crops_are_torchvisions_and_depend_on_the_image_alone():
    n = 4000
    crops = order.random_resized_crops(7, 1, np.arange(n), np.full(n, 500), np.full(n, 375), 0.08)
    # a function of (seed, epoch, index): the same alone, in another batch, or in another order
    alone = order.random_resized_crops(7, 1, [5], [500], [375], 0.08)
    shuffled = order.random_resized_crops(7, 1, [9, 5, 2], [500] * 3, [375] * 3, 0.08)
    for c in (alone, shuffled):
        k = 0 if c is alone else 1
        assert (c.left[k], c.top[k], c.width[k], c.height[k], c.flip[k]) == (
            crops.left[5], crops.top[5], crops.width[5], crops.height[5], crops.flip[5])  # fmt: skip
    other_epoch = order.random_resized_crops(7, 2, np.arange(n), np.full(n, 500), np.full(n, 375), 0.08)
    assert (other_epoch.left != crops.left).mean() > 0.9
    assert (crops.left >= 0).all() and (crops.left + crops.width <= 500).all()
    assert (crops.top >= 0).all() and (crops.top + crops.height <= 375).all()
    inside = (crops.width != 500) | (crops.height != 375)
    area = (crops.width * crops.height / (500 * 375))[inside]
    aspect = (crops.width / crops.height)[inside]
    assert area.min() >= 0.079 and area.max() <= 1.0 and area.min() < 0.1 and area.max() > 0.95  # torchvision's (0.08, 1)
    assert aspect.min() > 3 / 4 - 0.02 and aspect.max() < 4 / 3 + 0.02  # and (3/4, 4/3), up to rounding
    # the same distribution as torchvision's own RandomResizedCrop on the same image size: quantiles within 0.02
    import torch
    from PIL import Image as PILImage
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    ref = [RandomResizedCrop.get_params(PILImage.new("RGB", (500, 375)), (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    ref_area = np.array([w * h / (500 * 375) for _, _, h, w in ref])
    ref_aspect = np.array([w / h for _, _, h, w in ref])
    q = [0.1, 0.25, 0.5, 0.75, 0.9]
    all_area, all_aspect = crops.width * crops.height / (500 * 375), crops.width / crops.height
    assert np.abs(np.quantile(all_area, q) - np.quantile(ref_area, q)).max() < 0.02
    assert np.abs(np.quantile(all_aspect, q) - np.quantile(ref_aspect, q)).max() < 0.03
    assert 0.47 < crops.flip.mean() < 0.53
    # every position of a window that fits is reachable: the left edges spread over the whole free range
    small = crops.width < 250
    assert (crops.left[small] > 250).any() and (crops.left[small] < 10).any()
    tall = order.random_resized_crops(0, 0, [0], [10], [400], 0.99)  # no window fits: torchvision's centre-crop fallback
    assert (tall.width[0], tall.height[0], tall.top[0]) == (10, 13, (400 - 13) // 2)
    wide = order.random_resized_crops(0, 0, [0], [400], [10], 0.99)
    assert (wide.width[0], wide.height[0], wide.left[0]) == (13, 10, (400 - 13) // 2)


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
