"""One table of what a single CUDA GPU does with this project's training step, in under 8 minutes.

Needs only torch and torchvision (no Ray, DALI or MLflow): it drives the core layer through
rn50_ray.bench. Rows: the training step at batch 256, 224 px, synthetic data, for fp32, tf32,
amp-bf16 and amp-fp16 with channels_last on and off; the AMP rows again under torch.compile;
inference. Then, where DALI is installed, the dali-gpu input pipeline alone on generated JPEGs.
Skips cleanly, with exit status 0 and a message, where there is no CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rn50_ray.bench import bench_backend, print_table
from rn50_ray.config import load_config
from rn50_ray.data import dali_available

# Dense peak TFLOP/s (SXM parts) for the utilisation column: fp32, tf32, 16-bit.
PEAKS = {"H200": (67, 494, 989), "H100": (67, 494, 989), "A100": (19.5, 156, 312)}


def peak_tflops(name: str, precision: str) -> float | None:
    for key, (fp32, tf32, half) in PEAKS.items():
        if key in name:
            return {"fp32": fp32, "tf32": tf32}.get(precision, half)
    return None


def row(
    what, backend, *, precision="amp-bf16", channels_last=True, compile_=False, batch=256, steps=30, warmup=10, data="", size=224
):
    cfg = load_config(
        [],
        {
            "data.backend": backend,
            "data.path": data,
            "data.image_size": size,
            "data.loader_workers": 8,
            "batch.per_worker": batch,
            "batch.global_size": batch,
            "system.precision": precision,
            "system.compile": compile_,
            "model.memory_format": "channels_last" if channels_last else "contiguous",
        },
    )
    device = torch.device("cuda")
    args = argparse.Namespace(
        steps=steps, warmup=warmup, window=5, peak_tflops=peak_tflops(torch.cuda.get_device_name(), precision)
    )
    t = time.time()
    r = bench_backend(cfg, what, backend, device, args)
    r["wall_s"] = time.time() - t
    print(json.dumps(r), file=sys.stderr, flush=True)  # progress, and the raw figures
    return r


def write_jpegs(root: Path, n: int = 1024, classes: int = 8) -> Path:
    """Random 500x375 JPEGs (ImageNet's typical size) in train/ and val/ class folders."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", n), ("val", n // 8)):
        for i in range(count):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (375, 500, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)
    return root


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer rows: AMP and fp32 with channels_last, no compile")
    opts = p.parse_args()
    if not torch.cuda.is_available():
        print("skip: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured")
        return 0
    name = torch.cuda.get_device_name()
    print(f"gpu_check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    precisions = ("fp32", "amp-bf16", "amp-fp16") if opts.quick else ("fp32", "tf32", "amp-bf16", "amp-fp16")
    layouts = (True,) if opts.quick else (True, False)
    train = [row("train", "synthetic", precision=pr, channels_last=cl) for pr in precisions for cl in layouts]
    if not opts.quick:
        train += [row("train", "synthetic", precision=pr, compile_=True, warmup=15) for pr in ("amp-bf16", "amp-fp16")]
    print_table(train, "train")
    infer = [row("infer", "synthetic", precision=pr) for pr in ("amp-bf16", "amp-fp16")]
    print_table(infer, "infer")
    if not dali_available():
        print("skip dali-gpu: nvidia.dali is not installed (pip install nvidia-dali-cuda130==2.4.0)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jpegs(Path(tmp))
        dali = [row("data", b, data=str(data), steps=300, warmup=20) for b in ("dali-gpu", "dali-cpu")]
    print_table(dali, "data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
