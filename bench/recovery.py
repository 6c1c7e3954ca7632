"""Recovery figures: the same run, the same kill (a Ray Train worker SIGKILLed mid-epoch), under each
`--fault-tolerance` mode, through `launch.py train` on this machine, and an uninterrupted run for the overhead.

Per mode: the steps trained again; the longest time without a committed step (between two consecutive step lines
of the log, which comes every step); the seconds from the kill to the first step after it; and, under `replica`,
the seconds until the replacement takes part (its heal line). Figures go in docs/PERFORMANCE.md.

    python bench/recovery.py --data data/sample [--modes restart replica] [--workers 3] [--kill-at 25]
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


def kill_one_worker(driver_pid: int, first: bool = False) -> int:
    """SIGKILL one Ray Train worker started by this run (after its driver), never a leftover of another."""
    started = psutil.Process(driver_pid).create_time()
    workers = sorted(
        (p for p in psutil.process_iter(["cmdline", "create_time"])
         if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] >= started),
        key=lambda p: p.info["create_time"],
    )  # fmt: skip
    if not workers:
        raise SystemExit("no RayTrainWorker process of this run found to kill")
    victim = workers[0 if first else -1]
    victim.send_signal(signal.SIGKILL)
    return victim.pid


def run(opts, storage: str, mode: str, kill_at: int | None) -> dict:
    cmd = [
        sys.executable, str(ROOT / "launch.py"), "train", "--recipe", "cpu_demo", "--data", opts.data,
        "--storage", storage, "--name", "recovery", "--epochs", str(opts.epochs), "--warmup-epochs", "0.5",
        "--log-every", "1", "--checkpoint-every-steps", str(opts.checkpoint_every_steps), "--max-failures", "2",
        "--workers", str(opts.workers), "--cpus-per-worker", "0.5", "--global-batch", str(16 * opts.workers),
        "--batch-size", "16", "--fault-tolerance", mode, "--tracking", "off",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {"kill_s": None, "killed_at": None, "resumed_at": None, "first_step_after_s": None, "healed_s": None}
    first_step_s, last_step_s, longest_gap, retrained = None, None, 0.0, 0
    for line in proc.stdout:
        now = time.perf_counter() - t0
        if m := STEP.search(line):
            step = (int(m[1]) - 1) * int(m[3]) + int(m[2])
            first_step_s = first_step_s or now
            if last_step_s is not None and out["kill_s"] is not None:
                longest_gap = max(longest_gap, now - last_step_s)
            last_step_s = now
            if kill_at and out["kill_s"] is None and step >= kill_at:
                kill_one_worker(proc.pid)
                out.update(kill_s=now, killed_at=step)
            elif out["kill_s"] is not None and out["first_step_after_s"] is None:
                out["first_step_after_s"] = now
        elif (m := RESUMED.search(line)) and out["kill_s"] is not None:
            out["resumed_at"] = int(m[1])
        elif "replica: healed from a peer" in line and out["kill_s"] is not None and out["healed_s"] is None:
            out["healed_s"] = now
        elif "did not commit" in line:
            retrained += 1
    if proc.wait() != 0:
        raise SystemExit(f"training failed: {' '.join(cmd)}")
    steps_again = (out["killed_at"] - out["resumed_at"]) if out["resumed_at"] is not None else retrained
    return {
        **out, "wall_s": time.perf_counter() - t0, "first_step_s": first_step_s, "steps_trained_again": steps_again,
        "longest_gap_s": longest_gap,
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "sample"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["restart", "replica"], choices=["restart", "replica"])
    p.add_argument("--checkpoint-every-steps", type=int, default=10)
    p.add_argument("--kill-at", type=int, default=25, help="global step at which a worker is killed")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as base_dir:
        base = run(opts, base_dir, opts.modes[0], None)
    for mode in opts.modes:
        with tempfile.TemporaryDirectory() as d:
            hit = run(opts, d, mode, opts.kill_at)
        rows[mode] = {
            "steps trained again": hit["steps_trained_again"],
            "longest time without a committed step (s)": hit["longest_gap_s"],
            "kill to the next step (s)": hit["first_step_after_s"] - hit["kill_s"],
            "kill to the replacement taking part (s)": (hit["healed_s"] - hit["kill_s"]) if hit["healed_s"] else None,
            "run wall time over the uninterrupted run": hit["wall_s"] / base["wall_s"],
        }
    if opts.json:
        print(json.dumps({"workers": opts.workers, "kill_at": opts.kill_at, "rows": rows}, indent=2))
        return 0
    print(
        f"{opts.workers} workers, cpu_demo, a worker SIGKILLed at step {opts.kill_at}; uninterrupted run {base['wall_s']:.1f} s"
    )
    print(f"{'':>44} | " + " | ".join(f"{m:>8}" for m in rows))
    for key in next(iter(rows.values())):
        cells = [rows[m][key] for m in rows]
        print(f"{key:>44} | " + " | ".join(f"{c:>8.2f}" if isinstance(c, float) else f"{c!s:>8}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
