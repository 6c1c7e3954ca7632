"""Framework overhead and startup, measured in one run on this machine.

1. Steady-state training img/s of three sides on the same model, batch, image size and threads: a bare
   single-process PyTorch loop (torchvision ResNet50, torch.optim.SGD, cross entropy, one synthetic batch
   served every step), the same loop in a bare TorchTrainer with one worker (Ray's own cost), and
   `launch.py train` with one Ray worker (the synthetic backend serves one batch every step too). The
   bare loop uses the SGD kernel `launch.py train` picks (fused; `--bare-sgd default` for torch's own).

   All three run at once and take turns: while one trains, the others are stopped (SIGSTOP), for
   `--phase-s` seconds each, `--phases` times. For a Ray side the whole process tree is stopped (driver,
   GCS, raylet, Ray Train's actors and the worker), so Ray's own processes cost only their side. Only
   the img/s windows that lie wholly inside a turn count. This VM's speed switches between two levels
   about 17% apart every few to tens of seconds (a lone bare loop shows it), so turns are short and many,
   and each ratio is the median over rounds of one side's turn against the bare loop's turn just before.
   The step's threads leave one core to Ray's own processes (GCS, raylet, driver, Ray Train's controller
   and helper actors), as on a GPU node, where the step runs on the GPU and those processes on spare
   cores. `--threads` equal to the cores measures them contending with the step for every core instead.
2. Startup: seconds from starting the process to the end of the first training step, for `launch.py train`
   and for a bare TorchTrainer that trains the same model with the same workers (1 CPU each).

    python bench/overhead.py [--image-size 32] [--batch 32] [--phase-s 6] [--phases 20] [--threads N]
                             [--bare-sgd fused|default] [--no-startup] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
INTERVAL = re.compile(r"epoch \d+/\d+ step \d+/\d+ loss \S+ lr \S+ img/s ([\d.]+)")
WINDOW = re.compile(r"window img/s ([\d.]+)")
FIRST_STEP = re.compile(r"first step at ([\d.]+)")
LATENCY_S = 1.0  # a Ray worker's line reaches the driver's stdout up to this late

# The baselines, written plainly on purpose: a bare loop, the same loop in a bare TorchTrainer, and a
# bare TorchTrainer that takes one step (for startup).
BARE_STEPS = """
import sys, time, torch, torch.nn.functional as F, torchvision

def train(size, batch, window, threads, sgd):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875, weight_decay=3.0517578125e-05,
                          fused=sgd == "fused" or None)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    model.train()
    t = time.perf_counter()
    for i in range(1, 10**9):
        loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i % window == 0:
            loss.item()
            now = time.perf_counter()
            print(f"window img/s {window * batch / (now - t):.3f}", flush=True)
            t = now

args = [*map(int, sys.argv[1:5]), sys.argv[5]]
"""
BARE_LOOP = BARE_STEPS + "train(*args)\n"
BARE_TORCHTRAINER_LOOP = (
    BARE_STEPS
    + """
import os, ray, ray.train
from ray.train.torch import TorchTrainer
os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"  # as launch.py: worker prints reach the console once
ray.init()
TorchTrainer(lambda config: train(*args), scaling_config=ray.train.ScalingConfig(
    num_workers=1, resources_per_worker={"CPU": args[3]}), run_config=ray.train.RunConfig(storage_path=sys.argv[6])).fit()
"""
)
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


class Side:
    """One process tree whose img/s lines are read with their arrival times, and which can be paused."""

    def __init__(self, name: str, cmd: list[str], pattern: re.Pattern):
        self.name, self.pattern = name, pattern
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self.turns: list[tuple[float, float]] = []  # (start, end) of each turn, time.monotonic()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def windows(self) -> list[tuple[float, float]]:
        return [(t, float(m[1])) for t, line in self.lines if (m := self.pattern.search(line))]

    def wait_for_windows(self, n: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while len(self.windows()) < n:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name} stopped before training:\n" + "".join(line for _, line in self.lines)[-3000:])
            time.sleep(0.2)

    def signal(self, sig: int) -> None:
        root = psutil.Process(self.proc.pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)

    def counted(self, images_per_window: int) -> list[list[float]]:
        """Per turn, the img/s of the windows that lie wholly inside it."""
        windows = self.windows()
        return [
            [v for t, v in windows if start + LATENCY_S <= t - images_per_window / v and t <= end] for start, end in self.turns
        ]

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait()


def launch_train_cmd(opts, storage: str, workers: int, cpus: float, epochs: int, samples: int, name: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "launch.py"), "train", "--recipe", "cpu_demo", "--backend", "synthetic",
        "--image-size", str(opts.image_size), "--batch-size", str(opts.batch // workers), "--workers", str(workers),
        "--cpus-per-worker", str(cpus), "--epochs", str(epochs), "--warmup-epochs", "0", "--log-every", str(opts.window),
        "--set", f"batch.global_size={opts.batch}", "--set", f"data.synthetic_samples={samples}",
        "--storage", storage, "--name", name, "--tracking", "off",
    ]  # fmt: skip


def steady_state(opts, storage: str) -> dict:
    """The sides in turns; each figure is the median over the windows wholly inside its turns."""
    bare_args = [*map(str, (opts.image_size, opts.batch, opts.window, opts.threads)), opts.bare_sgd]
    starts = {
        "bare loop": ([sys.executable, "-c", BARE_LOOP, *bare_args], WINDOW),
        "bare TorchTrainer": ([sys.executable, "-c", BARE_TORCHTRAINER_LOOP, *bare_args, storage], WINDOW),
        "launch.py train": (launch_train_cmd(opts, storage, 1, opts.threads, 1, 10**6 * opts.batch, "overhead"), INTERVAL),
    }
    sides: list[Side] = []
    try:
        for name, (cmd, pattern) in starts.items():  # one at a time: each starts alone, then waits stopped
            sides.append(Side(name, cmd, pattern))
            sides[-1].wait_for_windows(2)
            sides[-1].signal(signal.SIGSTOP)
        for _ in range(opts.phases):
            for side in sides:
                side.signal(signal.SIGCONT)
                start = time.monotonic()
                time.sleep(opts.phase_s)
                side.signal(signal.SIGSTOP)
                side.turns.append((start, time.monotonic()))
    finally:
        for side in sides:
            side.stop()
    turns = {side.name: side.counted(opts.window * opts.batch) for side in sides}
    if any(sum(map(len, t)) < opts.phases for t in turns.values()):
        raise SystemExit(f"too few whole windows in the turns ({turns}); raise --phase-s")

    def ratios(name: str, base: str = "bare loop") -> list[float]:  # per round, against base's turn before
        pairs = zip(turns[base], turns[name], strict=True)
        return [statistics.median(r) / statistics.median(b) for b, r in pairs if b and r]

    turn_ratios = {name: ratios(name) for name in ("bare TorchTrainer", "launch.py train")}
    return {
        "threads": opts.threads,
        "img_per_s": {name: statistics.median(v for t in ts for v in t) for name, ts in turns.items()},
        "windows_counted": {name: sum(map(len, ts)) for name, ts in turns.items()},
        "turn_ratios": turn_ratios,
        "ratio_to_bare_loop": {name: statistics.median(r) for name, r in turn_ratios.items()},
        # this project's layer alone: launch.py against the bare TorchTrainer's turn just before
        "ratio_launch_to_bare_torchtrainer": statistics.median(ratios("launch.py train", "bare TorchTrainer")),
    }


def _run(cmd: list[str]) -> tuple[str, float]:
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr, t0


def startups(opts, storage: str) -> dict[str, float]:
    workers = opts.startup_workers
    text, _ = _run(launch_train_cmd(opts, storage, workers, 1, 1, 2 * opts.batch, "startup"))  # as ScalingConfig's default
    ours = float(re.search(r"startup: ([\d.]+) s", text)[1])
    script = [sys.executable, "-c", BARE_TORCHTRAINER, str(workers), str(opts.image_size)]
    text, t0 = _run([*script, str(opts.batch // workers), storage])
    return {"startup_launch_train_s": ours, "startup_bare_torchtrainer_s": float(FIRST_STEP.search(text)[1]) - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--phase-s", type=float, default=6.0, help="seconds of each turn")
    p.add_argument("--phases", type=int, default=20, help="turns of each side")
    p.add_argument("--window", type=int, default=5, help="steps per img/s figure (launch.py's --log-every)")
    spare_one = max((os.cpu_count() or 2) - 1, 1)
    p.add_argument(
        "--threads", type=int, default=spare_one, help="torch threads, the Ray worker's CPUs (default: all cores but one)"
    )
    p.add_argument("--startup-workers", type=int, default=2)
    p.add_argument("--bare-sgd", choices=("fused", "default"), default="fused", help="the bare loop's SGD kernel")
    p.add_argument("--no-startup", action="store_true", help="measure the steady state only")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rn50-overhead-") as storage:
        result = steady_state(opts, storage)
        if not opts.no_startup:
            result.update(startups(opts, storage))
            result["startup_ratio"] = result["startup_launch_train_s"] / result["startup_bare_torchtrainer_s"]
    if opts.json:
        print(json.dumps(result, indent=2))
        return 0
    shape = f"{opts.image_size} px, batch {opts.batch}, {opts.threads} threads"
    print(f"steady state: {shape}, {opts.phases} turns of {opts.phase_s:g} s each (img/s: median of the windows)")
    for name, ips in result["img_per_s"].items():
        line = f"  {name:22s} {ips:8.2f} img/s ({result['windows_counted'][name]} windows)"
        if name in result["ratio_to_bare_loop"]:
            turns = ", ".join(f"{r:.3f}" for r in result["turn_ratios"][name])
            line += f"  ratio {result['ratio_to_bare_loop'][name]:.3f} (turns: {turns})"
        print(line)
    print(f"  launch.py train against the bare TorchTrainer: ratio {result['ratio_launch_to_bare_torchtrainer']:.3f}")
    if opts.no_startup:
        return 0
    print(f"startup to the first finished training step, {opts.startup_workers} workers")
    print(f"  launch.py train            {result['startup_launch_train_s']:8.1f} s")
    print(f"  bare TorchTrainer          {result['startup_bare_torchtrainer_s']:8.1f} s")
    print(f"  ratio                      {result['startup_ratio']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
