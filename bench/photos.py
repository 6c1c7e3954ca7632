"""A folder of real photos at varied sizes for `bench data`, made offline from the photos installed packages ship
(scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg): crops of them resized to ImageNet's
common sizes (500 x 375, 375 x 500, 500 x 333, 500 x 500, up to 1024 x 768), saved as JPEGs of quality 85 to 95.
The Fashion-MNIST sample's 32 px or 224 px squares decode alike; these do not.

    python bench/photos.py --out /tmp/photos [--train-per-class 60] [--val-per-class 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (400, 300), (640, 480), (800, 600), (1024, 768), (300, 400)]


def sources() -> list[Image.Image]:
    import matplotlib
    import sklearn

    found = [
        Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
        Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg",
        Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
    ]
    missing = [str(p) for p in found if not p.is_file()]
    if missing:
        raise SystemExit(f"photos not found: {', '.join(missing)} (pip install scikit-learn matplotlib)")
    return [Image.open(p).convert("RGB") for p in found]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train-per-class", type=int, default=60)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--classes", type=int, default=10)
    opts = p.parse_args()
    photos, rng = sources(), np.random.default_rng(0)
    for split, n in (("train", opts.train_per_class), ("val", opts.val_per_class)):
        for c in range(opts.classes):
            folder = Path(opts.out) / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                photo = photos[int(rng.integers(len(photos)))]
                w, h = photo.size
                cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
                left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                size = SIZES[int(rng.integers(len(SIZES)))]
                img = photo.crop((left, top, left + cw, top + ch)).resize(size, Image.BICUBIC)
                img.save(folder / f"{split}_{c}_{i}.JPEG", quality=int(rng.integers(85, 96)))
    print(f"wrote {opts.out}: {opts.classes} classes, {opts.train_per_class} train and {opts.val_per_class} val photos each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
