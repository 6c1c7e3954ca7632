"""The folder checks, the pytorch backend and prepare-sample, on real JPEG files."""

import shutil

import pytest
import torch
from PIL import Image

from rn50_ray.config import DataConfig
from rn50_ray.data import Shard, make_loaders
from rn50_ray.data.folder import check_dataset
from rn50_ray.data.pytorch import ShardSampler, decode_rgb
from rn50_ray.data.sample import prepare_sample
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


def _loader(data, *, rank=0, world=1, per_rank=20, skip=False, size=32):
    cfg = DataConfig(path=str(data), backend="pytorch", image_size=size, loader_workers=0, skip_bad_images=skip)
    return make_loaders(
        cfg, Shard(rank, world, torch.device("cpu")), per_rank, global_batch=per_rank * world, seed=0, channels_last=False
    )


def test_skip_bad_images_counts_them(tiny_data, copy_of):
    data = copy_of(tiny_data)
    (data / "train" / "bag" / "broken.JPEG").write_bytes(b"junk")
    loaders = _loader(data, per_rank=67, skip=True)  # 201 images: 3 steps cover all
    n = sum(len(y) for _, y in loaders.train.epoch(0))
    assert loaders.train.skipped == 1 and n == 200
    with pytest.raises(DataError, match=r"broken\.JPEG: cannot decode image"):
        list(_loader(data, per_rank=67).train.epoch(0))


def test_batches_are_normalized_float_on_device(tiny_data):
    x, y = next(iter(_loader(tiny_data).train.epoch(0)))
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -3 < x.mean().item() < 3 and x.std().item() > 0.2


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_cover_the_epoch_and_global_batches_do_not_depend_on_world_size(world):
    n, global_batch, steps = 103, 8, 103 // 8
    per_rank = global_batch // world
    samplers = [ShardSampler(n, r, world, per_rank, steps, seed=3, shuffle=True) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    shards = [s.indices() for s in samplers]
    assert all(len(s) == steps * per_rank for s in shards)  # the same number of steps on every rank
    seen = [i for s in shards for i in s]
    assert len(set(seen)) == len(seen) == steps * global_batch
    one = ShardSampler(n, 0, 1, global_batch, steps, seed=3, shuffle=True)
    one.set_epoch(2)
    reference = one.indices()
    for t in range(steps):  # step t holds the same images whatever the world size
        step_t = {i for s in shards for i in s[t * per_rank : (t + 1) * per_rank]}
        assert step_t == set(reference[t * global_batch : (t + 1) * global_batch])
    samplers[0].set_epoch(2, start_step=5)  # a resume mid-epoch skips exactly the steps done
    assert samplers[0].indices() == shards[0][5 * per_rank :]
