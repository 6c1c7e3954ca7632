"""What a single CUDA GPU does with this project, in tables, in under 8 minutes.

Needs only torch and torchvision (no Ray, DALI or MLflow): it drives the core layer through
rn50_ray.bench and the real training loop through LocalContext. Rows: the training step at batch 256,
224 px, synthetic data, for fp32, tf32, amp-bf16 and amp-fp16 with channels_last on and off; the AMP rows
again under torch.compile; inference; the training loop under amp-bf16 and amp-fp16 (its loss scaler),
with the EMA on, crashed and resumed in new processes (bench/resume_check.py), its per-step losses against
an uninterrupted run's and its peak memory in training and in validation (at the capped val batch). Then,
where DALI is installed, the dali-gpu input pipeline alone on generated JPEGs. Skips cleanly, with exit
status 0 and a message, where there is no CUDA GPU. `--cpu-smoke` runs the same rows on the CPU at toy
sizes, to prove the script end to end before a GPU's scarce minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rn50_ray.bench import BenchOptions, bench_backend, print_table
from rn50_ray.config import load_config
from rn50_ray.data.backends import dali_available
from rn50_ray.evaluate import pick_device

HERE = Path(__file__).resolve().parent

# Dense peak TFLOP/s (SXM parts) for the utilisation column: fp32, tf32, 16-bit.
PEAKS = {"H200": (67, 494, 989), "H100": (67, 494, 989), "A100": (19.5, 156, 312)}


def peak_tflops(name: str, precision: str) -> float | None:
    for key, (fp32, tf32, half) in PEAKS.items():
        if key in name:
            return {"fp32": fp32, "tf32": tf32}.get(precision, half)
    return None


# The sizes of a measurement on the GPU, and of --cpu-smoke (which measures nothing).
GPU = {"device": "cuda", "size": 224, "batch": 256, "steps": 30, "warmup": 10, "window": 5, "max_batch": 1024, "jpegs": 1536,
       "micro": 128, "loader_workers": 8, "resume_jpegs": 1536, "resume_size": 224}  # fmt: skip
SMOKE = {"device": "cpu", "size": 32, "batch": 4, "steps": 2, "warmup": 1, "window": 1, "max_batch": 8, "jpegs": 64,
         "micro": 2, "loader_workers": 0, "resume_jpegs": 12, "resume_size": 32}  # fmt: skip


def row(what, backend, plan, *, precision="amp-bf16", channels_last=True, compile_=False, steps=None, warmup=None, data=""):
    cfg = load_config(
        [],
        {
            "data.backend": backend,
            "data.path": data,
            "data.image_size": plan["size"],
            "data.loader_workers": max(plan["loader_workers"], 1),
            "batch.per_worker": plan["batch"],
            "batch.global_size": plan["batch"],
            "system.precision": precision,
            "system.compile": compile_,
            "model.memory_format": "channels_last" if channels_last else "contiguous",
        },
    )
    device = pick_device(plan["device"])  # cuda:N, as DALI's device_id needs
    peak = peak_tflops(torch.cuda.get_device_name(), precision) if device.type == "cuda" else None
    smoke = device.type == "cpu"
    args = BenchOptions(
        what=what,
        steps=plan["steps"] if smoke or steps is None else steps,
        warmup=plan["warmup"] if smoke or warmup is None else warmup,
        window=plan["window"],
        max_batch=plan["max_batch"],
        peak_tflops=peak,
    )
    t = time.time()
    r = bench_backend(cfg, what, backend, device, args)
    r["wall_s"] = time.time() - t
    print(json.dumps(r), file=sys.stderr, flush=True)  # progress, and the raw figures
    return r


def write_jpegs(root: Path, n: int, classes: int = 8) -> Path:
    """Random 500x375 JPEGs (ImageNet's typical size) in train/ and val/ class folders."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", n), ("val", max(n // 8, classes))):  # every class in both
        for i in range(count):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (375, 500, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)
    return root


RESUME_COLUMNS = ("precision", "steps", "crash at", "resumed from", "max loss diff", "train GiB", "val GiB", "val batch",
                  "EMA top1", "wall s")  # fmt: skip


def resume_row(precision: str, plan: dict, data: Path, out: Path) -> dict:
    """The training loop crashed and resumed (bench/resume_check.py, three processes) against an uninterrupted run."""
    epochs, steps_per_epoch = 2, plan["resume_jpegs"] // plan["batch"]
    args = [
        "--data", str(data), "--out", str(out), "--device", plan["device"], "--precision", precision,
        "--size", str(plan["resume_size"]), "--global-batch", str(plan["batch"]), "--micro", str(plan["micro"]),
        "--epochs", str(epochs), "--every", "4", "--crash-at", str(steps_per_epoch + 2),
        "--workers", str(plan["loader_workers"]), "--deterministic",
    ]  # fmt: skip
    t = time.time()
    for part in ("full", "crash", "resume"):
        done = subprocess.run([sys.executable, str(HERE / "resume_check.py"), part, *args], capture_output=True, text=True)
        if done.returncode != (3 if part == "crash" else 0):
            raise SystemExit(f"resume_check {part} ({precision}) failed:\n{done.stderr[-3000:]}")
    full, resumed = (json.loads((out / f"{part}.json").read_text()) for part in ("full", "resume"))
    diffs = [abs(loss - full["losses"][step]) for step, loss in resumed["losses"].items()]
    if not diffs or len(resumed["losses"]) + resumed["resumed_from"] != len(full["losses"]):
        raise SystemExit(f"resume_check ({precision}): the resumed run did not finish the schedule: {resumed}")
    r = {
        "precision": precision,
        "steps": len(full["losses"]),
        "crash at": steps_per_epoch + 2,
        "resumed from": resumed["resumed_from"],
        "max loss diff": max(diffs),
        "train GiB": full.get("train_peak_gib", float("nan")),
        "val GiB": full.get("val_peak_gib", float("nan")),
        "val batch": full["val_batch"],
        "EMA top1": full["val_ema_top1"],
        "wall s": time.time() - t,
    }
    print(json.dumps(r), file=sys.stderr, flush=True)
    return r


def print_resume_table(rows: list[dict], device: str, size: int) -> None:
    print(f"resume on {device}, {size} px: crashed (os._exit) and resumed in new processes, against an uninterrupted run")
    print(" | ".join(f"{c:>15}" for c in RESUME_COLUMNS))
    for r in rows:
        cells = [f"{r[c]:>15.3g}" if isinstance(r[c], float) else f"{r[c]!s:>15}" for c in RESUME_COLUMNS]
        print(" | ".join(cells))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer rows: AMP and fp32 with channels_last, no compile")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="every row but the compiled ones on the CPU at 32 px, batch 4, 2 steps: checks the script, measures nothing",
    )
    opts = p.parse_args()
    if opts.cpu_smoke:
        plan = SMOKE
        print(f"gpu_check --cpu-smoke, torch {torch.__version__}: toy sizes on the CPU, not a measurement", flush=True)
    elif not torch.cuda.is_available():
        print("skip: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured")
        return 0
    else:
        plan = GPU
        name = torch.cuda.get_device_name()
        print(f"gpu_check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    precisions = ("fp32", "amp-bf16", "amp-fp16") if opts.quick else ("fp32", "tf32", "amp-bf16", "amp-fp16")
    layouts = (True,) if opts.quick else (True, False)
    train = [row("train", "synthetic", plan, precision=pr, channels_last=cl) for pr in precisions for cl in layouts]
    # Compiling ResNet50 takes minutes on a CPU; the compile switch has its own test (test_fast_path).
    if not opts.quick and not opts.cpu_smoke:
        amp = ("amp-bf16", "amp-fp16")
        train += [row("train", "synthetic", plan, precision=pr, compile_=True, warmup=15) for pr in amp]
    print_table(train, "train")
    infer = [row("infer", "synthetic", plan, precision=pr) for pr in ("amp-bf16", "amp-fp16")]
    print_table(infer, "infer")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jpegs(Path(tmp) / "jpegs", plan["jpegs"])
        small = data if plan["resume_jpegs"] == plan["jpegs"] else write_jpegs(Path(tmp) / "small", plan["resume_jpegs"])
        resumes = [resume_row(pr, plan, small, Path(tmp) / pr) for pr in ("amp-bf16", "amp-fp16")]
        print_resume_table(resumes, str(pick_device(plan["device"])), plan["resume_size"])
        if not dali_available():
            print("skip dali-gpu: nvidia.dali is not installed (pip install nvidia-dali-cuda130==2.4.0)")
            return 0
        backends = ("dali-cpu",) if opts.cpu_smoke else ("dali-gpu", "dali-cpu")
        dali = [row("data", b, plan, data=str(data), steps=300, warmup=20) for b in backends]
    print_table(dali, "data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
