"""`prepare-sample`: a small, real ImageNet-style JPEG folder made from Fashion-MNIST.

Debian's `dataset-fashion-mnist` package installs the IDX files offline. Images are upscaled
from 28 px to the chosen size and saved as RGB JPEGs under train/<class>/ and val/<class>/.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from rn50_ray.data.folder import CLASS_NAMES_FILE
from rn50_ray.errors import DataError

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
# Fashion-MNIST's own class names, written as classes.json (as prepare-imagenet writes ImageNet's)
NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
INSTALL_HINT = "install it with: apt-get update && apt-get install -y dataset-fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _pick(labels: np.ndarray, per_class: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        if per_class > len(idx):
            raise DataError(
                f"--{'train' if seed == 0 else 'val'}-per-class: at most {len(idx)} images exist "
                f"for class {CLASSES[c]}, got {per_class}"
            )
        picked.extend(rng.choice(idx, per_class, replace=False).tolist())
    return picked


def prepare_sample(
    out: str | os.PathLike,
    *,
    train_per_class: int = 100,
    val_per_class: int = 20,
    size: int = 32,
    source: str | os.PathLike = DEFAULT_SOURCE,
    force: bool = False,
    quality: int = 90,
) -> Path:
    """Write the folder (through a temporary sibling and a rename) and return its path."""
    src, out = Path(source), Path(out)
    files = {
        s: (src / f"{p}-images-idx3-ubyte.gz", src / f"{p}-labels-idx1-ubyte.gz")
        for s, p in (("train", "train"), ("val", "t10k"))
    }
    missing = [str(f) for pair in files.values() for f in pair if not f.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: Fashion-MNIST not found; {INSTALL_HINT}")
    if size < 8:
        raise DataError(f"--size: expected at least 8 pixels, got {size}")
    if train_per_class < 1 or val_per_class < 1:
        raise DataError("--train-per-class and --val-per-class: expected at least 1")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise DataError(f"{out}: exists and is not empty; pass --force to replace it")
        shutil.rmtree(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, per_class, seed in (("train", train_per_class, 0), ("val", val_per_class, 1)):
        images, labels = read_idx(files[split][0]), read_idx(files[split][1])
        for name in CLASSES:
            (tmp / split / name).mkdir(parents=True, exist_ok=True)
        for i in _pick(labels, per_class, seed):
            img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
            img.save(tmp / split / CLASSES[labels[i]] / f"{split}_{i:05d}.JPEG", quality=quality)
    (tmp / CLASS_NAMES_FILE).write_text(json.dumps(dict(zip(CLASSES, NAMES, strict=True)), indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
