"""Recovery figures: a run whose Ray Train worker is SIGKILLed mid-epoch, against the same run
uninterrupted, both through `launch.py train` on this machine.

Prints the seconds from the kill to the first training step after the restart, the optimizer
steps lost (trained again), and the wall-clock overhead of the whole run. Figures go in
docs/PERFORMANCE.md.

    python bench/recovery.py --data data/sample [--epochs 2] [--checkpoint-every-steps 10] [--kill-at 40]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
STEP = re.compile(r"epoch (\d+)/\d+ step (\d+)/(\d+) ")
RESUMED = re.compile(r"resumed from .*: epoch \d+, step (\d+) ")


def kill_one_worker(driver_pid: int) -> None:
    """SIGKILL one Ray Train worker started by this run (after its driver), never a leftover of another."""
    started = psutil.Process(driver_pid).create_time()
    workers = [
        p
        for p in psutil.process_iter(["cmdline", "create_time"])
        if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] >= started
    ]
    if not workers:
        raise SystemExit("no RayTrainWorker process of this run found to kill")
    workers[-1].send_signal(signal.SIGKILL)


def run(opts, storage: str, kill_at: int | None) -> dict:
    cmd = [
        sys.executable, str(ROOT / "launch.py"), "train", "--recipe", "cpu_demo", "--data", opts.data,
        "--storage", storage, "--name", "recovery", "--epochs", str(opts.epochs), "--warmup-epochs", "0.5",
        "--log-every", "1", "--checkpoint-every-steps", str(opts.checkpoint_every_steps), "--max-failures", "2",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {"kill_s": None, "killed_at": None, "resumed_at": None, "first_step_after_s": None}
    first_step_s = None
    for line in proc.stdout:
        now = time.perf_counter() - t0
        if m := STEP.search(line):
            step = (int(m[1]) - 1) * int(m[3]) + int(m[2])
            first_step_s = first_step_s or now
            if kill_at and out["kill_s"] is None and step >= kill_at:
                kill_one_worker(proc.pid)
                out.update(kill_s=now, killed_at=step)
            elif out["resumed_at"] is not None and out["first_step_after_s"] is None:
                out["first_step_after_s"] = now
        elif (m := RESUMED.search(line)) and out["kill_s"] is not None:
            out["resumed_at"] = int(m[1])
    if proc.wait() != 0:
        raise SystemExit(f"training failed: {' '.join(cmd)}")
    out.update(wall_s=time.perf_counter() - t0, first_step_s=first_step_s)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "sample"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--checkpoint-every-steps", type=int, default=10)
    p.add_argument("--kill-at", type=int, default=45, help="global step at which a worker is killed")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        base = run(opts, a, None)
        hit = run(opts, b, opts.kill_at)
    if hit["resumed_at"] is None:
        raise SystemExit("the killed run never logged a resume")
    result = {
        "recovery_s": hit["first_step_after_s"] - hit["kill_s"],
        "steps_lost": hit["killed_at"] - hit["resumed_at"],
        "checkpoint_every_steps": opts.checkpoint_every_steps,
        "wall_uninterrupted_s": base["wall_s"],
        "wall_with_failure_s": hit["wall_s"],
        "overhead_s": hit["wall_s"] - base["wall_s"],
        "overhead_ratio": hit["wall_s"] / base["wall_s"],
        "startup_to_first_step_s": base["first_step_s"],
    }
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>26}: {v:.2f}" if isinstance(v, float) else f"{k:>26}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
