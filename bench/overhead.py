"""Framework overhead and startup, measured in one run on this machine.

1. Steady-state training img/s of a bare single-process PyTorch loop (torchvision ResNet50, torch.optim.SGD,
   cross entropy, one synthetic batch served every step) against `launch.py train` with one Ray worker on
   the same model, batch, image size and threads (the synthetic backend serves one batch every step too).
   Rounds alternate between the two, so drift on a noisy machine hits both.
2. Startup: seconds from starting the process to the end of the first training step, for `launch.py train`
   and for a bare TorchTrainer that trains the same model with the same workers.

    python bench/overhead.py [--image-size 32] [--batch 32] [--steps 60] [--threads 2] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTERVAL = re.compile(r"epoch (\d+)/\d+ step \d+/\d+ loss \S+ lr \S+ img/s ([\d.]+)")
FIRST_STEP = re.compile(r"first step at ([\d.]+)")

# A bare loop and a bare TorchTrainer, written plainly on purpose: they are the baselines.
BARE_LOOP = """
import sys, time, torch, torch.nn.functional as F, torchvision
size, batch, steps, window, threads = map(int, sys.argv[1:6])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = torchvision.models.resnet50(num_classes=1000)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875, weight_decay=3.0517578125e-05)
images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
model.train()
t = time.perf_counter()
for i in range(1, steps + 1):
    loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if i % window == 0:
        loss.item()
        now = time.perf_counter()
        print(f"window img/s {window * batch / (now - t):.3f}", flush=True)
        t = now
"""

BARE_TORCHTRAINER = """
import sys, time, ray, ray.train, ray.train.torch
from ray.train.torch import TorchTrainer
workers, size, batch = map(int, sys.argv[1:4])

def train_fn(config):
    import torch, torch.nn.functional as F, torchvision
    model = ray.train.torch.prepare_model(torchvision.models.resnet50(num_classes=1000))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    F.cross_entropy(model(images), labels).backward()
    opt.step()
    if ray.train.get_context().get_world_rank() == 0:
        print(f"first step at {time.time():.3f}", flush=True)
    ray.train.report({"done": 1})

ray.init()
TorchTrainer(train_fn, scaling_config=ray.train.ScalingConfig(num_workers=workers),
             run_config=ray.train.RunConfig(storage_path=sys.argv[4], name="bare")).fit()
"""


def _run(cmd: list[str]) -> tuple[str, float]:
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr, t0


def bare_loop(opts) -> float:
    text, _ = _run(
        [sys.executable, "-c", BARE_LOOP, *map(str, (opts.image_size, opts.batch, opts.steps, opts.window, opts.threads))]
    )
    windows = [float(x) for x in re.findall(r"window img/s ([\d.]+)", text)]
    return statistics.median(windows[1:])  # the first window warms up


def launch_train(opts, storage: str, workers: int, cpus: float, epochs: int, steps: int, name: str) -> tuple[str, float]:
    return _run([
        sys.executable, str(ROOT / "launch.py"), "train", "--recipe", "cpu_demo", "--backend", "synthetic",
        "--image-size", str(opts.image_size), "--batch-size", str(opts.batch // workers), "--workers", str(workers),
        "--cpus-per-worker", str(cpus), "--epochs", str(epochs), "--warmup-epochs", "0", "--log-every", str(opts.window),
        "--set", f"batch.global_size={opts.batch}", "--set", f"data.synthetic_samples={steps * opts.batch}",
        "--storage", storage, "--name", name, "--tracking", "off",
    ])  # fmt: skip


def ray_worker(opts, storage: str, name: str) -> float:
    text, _ = launch_train(opts, storage, 1, opts.threads, 2, opts.steps // 2, name)
    ips = [float(m[2]) for m in INTERVAL.finditer(text)]
    return statistics.median(ips[1:])  # same windows, the first warms up


def startups(opts, storage: str) -> dict[str, float]:
    text, t0 = launch_train(opts, storage, opts.startup_workers, opts.threads / opts.startup_workers, 1, 2, "startup")
    ours = float(re.search(r"startup: ([\d.]+) s", text)[1])
    script = [sys.executable, "-c", BARE_TORCHTRAINER, str(opts.startup_workers), str(opts.image_size)]
    text, t0 = _run([*script, str(opts.batch // opts.startup_workers), storage])
    return {"startup_launch_train_s": ours, "startup_bare_torchtrainer_s": float(FIRST_STEP.search(text)[1]) - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=60, help="training steps per measurement (the Ray run: 2 epochs of half)")
    p.add_argument("--window", type=int, default=10, help="steps per img/s figure")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the Ray worker's CPUs)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--startup-workers", type=int, default=2)
    p.add_argument("--json", action="store_true")
    opts = p.parse_args()
    bare, ray_ = [], []
    with tempfile.TemporaryDirectory(prefix="rn50-overhead-") as storage:
        for i in range(opts.rounds):
            bare.append(bare_loop(opts))
            ray_.append(ray_worker(opts, storage, f"overhead{i}"))
        result = {
            "bare_loop_img_per_s": statistics.median(bare),
            "launch_train_1_worker_img_per_s": statistics.median(ray_),
            "rounds_bare": bare,
            "rounds_launch_train": ray_,
        }
        # Each round runs the two back to back: their ratio is steadier than either figure on a noisy machine.
        result["round_ratios"] = [r / b for r, b in zip(ray_, bare, strict=True)]
        result["ray_over_bare"] = statistics.median(result["round_ratios"])
        result.update(startups(opts, storage))
        result["startup_ratio"] = result["startup_launch_train_s"] / result["startup_bare_torchtrainer_s"]
    if opts.json:
        print(json.dumps(result, indent=2))
        return 0
    rounds = ", ".join(f"{r:.3f}" for r in result["round_ratios"])
    print(f"steady state: {opts.image_size} px, batch {opts.batch}, {opts.threads} threads, {opts.rounds} rounds")
    print(f"  bare PyTorch loop          {result['bare_loop_img_per_s']:8.2f} img/s (median)")
    print(f"  launch.py train, 1 worker  {result['launch_train_1_worker_img_per_s']:8.2f} img/s (median)")
    print(f"  ratio                      {result['ray_over_bare']:8.3f} (median of the rounds' ratios: {rounds})")
    print(f"startup to the first finished training step, {opts.startup_workers} workers")
    print(f"  launch.py train            {result['startup_launch_train_s']:8.1f} s")
    print(f"  bare TorchTrainer          {result['startup_bare_torchtrainer_s']:8.1f} s")
    print(f"  ratio                      {result['startup_ratio']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
