"""`prepare-imagenet` on miniature archives in ImageNet's exact official formats (a tar of class tars, a flat val
tar, a devkit with meta.mat and the val ground truth) and in Kaggle's layout, built here from the Fashion-MNIST
sample; a run killed mid-way and resumed; and the result trained on. Then data folders that would mislabel
quietly: symbolic-link cycles, files reached twice, images too large to decode."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, listed
from PIL import Image

from rn50_ray.cli import main
from rn50_ray.errors import DataError

WNIDS = [f"n{i:08d}" for i in range(1, 11)]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _official(sample: Path, out: Path) -> Path:
    """ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz, in miniature."""
    import scipy.io

    train, val = listed(sample)
    out.mkdir()
    with tarfile.open(out / "ILSVRC2012_img_train.tar", "w") as outer:
        for label, wnid in enumerate(WNIDS):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for k, (path, _) in enumerate(s for s in train.samples if s[1] == label):
                    _add(tar, f"{wnid}_{k}.JPEG", Path(path).read_bytes())
            _add(outer, f"{wnid}.tar", inner.getvalue())
    shuffled = [val.samples[i] for i in np.random.default_rng(0).permutation(len(val))]  # val is flat, classes mixed
    with tarfile.open(out / "ILSVRC2012_img_val.tar", "w") as tar:
        for k, (path, _) in enumerate(shuffled, 1):
            _add(tar, f"ILSVRC2012_val_{k:08d}.JPEG", Path(path).read_bytes())
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    synsets = [(i + 1, wnid, f"{name}, class {i + 1}", "a gloss", 0, np.zeros(0), 0, 20) for i, (wnid, name) in
               enumerate(zip(WNIDS, train.classes, strict=True))]  # fmt: skip
    synsets.append((11, "n09999999", "entity", "a parent synset, not a class", 10, np.arange(1, 11), 5, 0))
    meta = np.array(synsets, dtype=[(f, "O") for f in fields])
    with tarfile.open(out / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        mat = io.BytesIO()
        scipy.io.savemat(mat, {"synsets": meta})
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        truth = "".join(f"{label + 1}\n" for _, label in shuffled)  # ILSVRC2012_IDs of the sorted val files
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth.encode())
    return out


def _kaggle(sample: Path, out: Path) -> Path:
    train, val = listed(sample)
    base = out / "ILSVRC" / "Data" / "CLS-LOC"
    for label, wnid in enumerate(WNIDS):
        (base / "train" / wnid).mkdir(parents=True)
        for k, (path, _) in enumerate(s for s in train.samples if s[1] == label):
            shutil.copy(path, base / "train" / wnid / f"{wnid}_{k}.JPEG")
    (base / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for k, (path, label) in enumerate(val.samples, 1):
        shutil.copy(path, base / "val" / f"ILSVRC2012_val_{k:08d}.JPEG")
        rows.append(f"ILSVRC2012_val_{k:08d},{WNIDS[label]} 1 2 30 30")
    (out / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (out / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}, kaggle\n" for w, n in zip(WNIDS, train.classes, strict=True)))
    return out


KILL_AT_70TH_FILE = """
import os, signal, sys
import rn50_ray.data.imagenet as imagenet
write, written = imagenet._write_member, [0]
def dying(*args):  # a real SIGKILL at a known point: the 70th image, the 10th of the 4th class
    written[0] += 1
    if written[0] == 70:
        os.kill(os.getpid(), signal.SIGKILL)
    write(*args)
imagenet._write_member = dying
from rn50_ray.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _labels(data: Path) -> dict[str, set[str]]:
    """{class folder: the original sample's image bytes' digests}: what each prepared class holds."""
    import hashlib

    train, _ = listed(data)
    out: dict[str, set[str]] = {}
    for path, label in train.samples:
        out.setdefault(train.classes[label], set()).add(hashlib.sha1(Path(path).read_bytes()).hexdigest())
    return out


def test_official_archives_killed_mid_way_resume_and_train(tiny_data, tmp_path, capsys):
    source, out = _official(tiny_data, tmp_path / "src"), tmp_path / "imagenet"
    args = ["prepare-imagenet", "--source", str(source), "--out", str(out), "--no-md5", "--subset"]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_70TH_FILE, *args, "--workers", "1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = sorted(p.name for p in (out / "train").iterdir())
    assert left == [f".{WNIDS[3]}.partial", *WNIDS[:3]] and len(list((out / "train" / f".{WNIDS[3]}.partial").iterdir())) == 9
    assert not (out / "val").exists()

    assert main([*args, "--workers", "2"]) == 0  # the rerun: the 3 done classes are skipped, the partial one redone
    report = capsys.readouterr().out
    assert "train: 10 classes, 3 already complete, 7 to extract with 2 process(es)" in report
    assert f"{out}: 10 classes, 200 train / 50 val images" in report
    train, _ = listed(out)
    assert train.classes == tuple(WNIDS) and not list((out / "train").glob(".*"))
    assert _labels(out) == {w: digests for w, digests in zip(WNIDS, _labels(tiny_data).values(), strict=True)}
    val_counts = {w: len(os.listdir(out / "val" / w)) for w in WNIDS}
    assert val_counts == dict.fromkeys(WNIDS, 5)  # the ground truth put every val image in its class
    names = json.loads((out / "classes.json").read_text())
    assert names[WNIDS[0]] == f"{listed(tiny_data)[0].classes[0]}, class 1" and "n09999999" not in names

    # It trains: one epoch of the core loop on the prepared folder.
    from rn50_ray.config import load_config, resolve
    from rn50_ray.core.context import LocalContext
    from rn50_ray.core.loop import fit
    from rn50_ray.data.loaders import open_loaders
    from rn50_ray.data.types import Shard

    assert (out / ".rn50-manifest.parquet").is_file()  # prepare-imagenet leaves the folder's manifest: no scan later
    cfg = load_config([str(ROOT / "recipes" / "cpu_demo.yaml")], {"data.path": str(out), "data.backend": "pytorch",
                                                                 "schedule.epochs": 1, "schedule.warmup_epochs": 0})  # fmt: skip
    lines: list[str] = []
    plan, loaders = open_loaders(resolve(cfg), Shard(0, 1, torch.device("cpu")), channels_last=False, log=lines.append)
    assert lines == []  # the manifest prepare-imagenet wrote was current: read, nothing scanned
    summary = fit(cfg, LocalContext(tmp_path / "run", quiet=True), loaders, plan)
    assert summary["finished"] and summary["step"] == 6 and loaders.num_classes == 10


def test_a_corrupt_download_is_caught_by_the_official_md5(tiny_data, tmp_path, capsys):
    source = _official(tiny_data, tmp_path / "src")
    assert main(["prepare-imagenet", "--source", str(source), "--out", str(tmp_path / "out")]) == 2
    assert "MD5 differs from the official archive's: a corrupt or partial download" in capsys.readouterr().err
    assert main(["prepare-imagenet", "--source", str(source), "--out", str(tmp_path / "out"), "--no-md5"]) == 2
    err = capsys.readouterr().err  # without --subset, a miniature set is not ImageNet
    assert "expected ImageNet's 1000 classes, 1281167 train and 50000 val images, got 10, 200 and 50" in err


def test_kaggle_layout_prepares_the_same_folders(tiny_data, tmp_path, capsys):
    source, out = _kaggle(tiny_data, tmp_path / "kaggle"), tmp_path / "imagenet"
    assert main(["prepare-imagenet", "--source", str(source), "--out", str(out), "--subset", "--workers", "2"]) == 0
    assert f"{out}: 10 classes, 200 train / 50 val images" in capsys.readouterr().out
    train, val = listed(out)
    assert train.classes == val.classes == tuple(WNIDS)
    first = next((out / "train" / WNIDS[0]).iterdir())
    assert first.stat().st_nlink == 2  # hard links: no second copy of the train set
    assert json.loads((out / "classes.json").read_text())[WNIDS[1]].endswith(", kaggle")
    assert {w: len(os.listdir(out / "val" / w)) for w in WNIDS} == dict.fromkeys(WNIDS, 5)


def test_a_png_and_a_cmyk_jpeg_named_jpeg_are_reported(tiny_data, tmp_path, capsys):
    source = _kaggle(tiny_data, tmp_path / "kaggle")
    folder = source / "ILSVRC" / "Data" / "CLS-LOC" / "train" / WNIDS[0]
    img = Image.open(next(folder.iterdir())).convert("RGB")
    img.save(folder / "n02105855_2933.JPEG", format="PNG")  # as ImageNet's own
    img.convert("CMYK").save(folder / "n01739381_1309.JPEG", format="JPEG")
    assert main(["prepare-imagenet", "--source", str(source), "--out", str(tmp_path / "out"), "--subset"]) == 0
    out = capsys.readouterr().out
    assert "1 file(s) named .JPEG that are a PNG: n02105855_2933.JPEG" in out
    assert "1 file(s) named .JPEG that are a CMYK JPEG: n01739381_1309.JPEG" in out


def test_a_symlinked_class_folder_works_a_cycle_fails_naming_the_link(tiny_data, copy_of, tmp_path):
    data = copy_of(tiny_data)
    elsewhere = tmp_path / "other-disk" / "bag"
    elsewhere.parent.mkdir()
    shutil.move(data / "train" / "bag", elsewhere)
    (data / "train" / "bag").symlink_to(elsewhere)  # data spread over disks
    train, _ = listed(data)
    assert len(train) == 200 and train.classes.count("bag") == 1
    (elsewhere / "again").symlink_to(elsewhere / "..")  # a link to an ancestor: once 41,200 images "found"
    with pytest.raises(DataError, match=rf"^{data / 'train' / 'bag' / 'again'}: a symbolic link that leads back into a folder"):
        listed(data)
    (elsewhere / "again").unlink()
    (data / "train" / "coat" / "twin.JPEG").symlink_to(next(elsewhere.glob("*.JPEG")))  # a file reached twice
    train, _ = listed(data)
    assert len(train) == 200 and train.duplicates == 1


def _huge(path: Path, pixels: int) -> None:
    side = int(pixels**0.5) + 1
    Image.MAX_IMAGE_PIXELS, limit = None, Image.MAX_IMAGE_PIXELS
    try:
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(path, quality=30)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_images_too_large_to_decode_are_named_before_training_and_skippable(tiny_data, copy_of, tmp_path, capsys):
    # 150 megapixels: DALI's CPU decoder fails on it ("Image too large") and PIL calls it a decompression bomb.
    data = copy_of(tiny_data)
    huge = data / "train" / "bag" / "huge.JPEG"
    _huge(huge, 150_000_000)
    from rn50_ray.config import load_config, resolve
    from rn50_ray.data.checks import usable_dataset
    from rn50_ray.data.pytorch import decode_rgb

    args = ["train", "--recipe", "cpu_demo", "--data", str(data), "--storage", str(tmp_path / "runs"), "--tracking", "off"]
    assert main(args) == 2  # named before any worker starts
    captured = capsys.readouterr()
    assert f"{huge}: cannot decode image (too large to decode" in captured.err
    assert "screened 251 images in" in captured.out
    cfg = resolve(load_config([str(ROOT / "recipes" / "cpu_demo.yaml")], {"data.path": str(data), "data.skip_bad_images": True}))
    dataset = usable_dataset(cfg)  # --skip-bad-images: left out, and counted in the run
    assert len(dataset.train) == 200 and dataset.train.excluded == 1 and "bag/huge.JPEG" not in set(dataset.train.paths)
    assert "screened" not in capsys.readouterr().out  # the manifest of the first command: no second screen
    with pytest.raises(DataError, match=r"huge\.JPEG: cannot decode image \(DecompressionBomb"):
        decode_rgb(str(huge))  # unscreened, the pytorch backend says the same instead of warning
