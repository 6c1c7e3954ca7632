"""What ImageNet's file count costs a start, a restart and a scan, against the demo sample, on this machine.

Builds a folder shaped like ImageNet (1,000 classes of 1,281 train and 50 val images: 1,331,000 hard links to the
sample's real JPEGs, so decoding stays cheap and only the file count is ImageNet's), then for it and for a copy
of the sample (hard links too) measures:
- the manifest: scan and screen cold (no manifest), and warm (the manifest read and checked);
- `launch.py train` from launch to its first finished step, cold (no manifest) and warm;
- a worker restart: a Ray Train worker SIGKILLed after the first step, to the first step of the new group.
Each figure is also printed as the ImageNet-shaped folder's over the sample's.

    python bench/scale.py --sample data/sample [--classes 1000] [--train-per-class 1281] [--val-per-class 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rn50_ray.data.manifest import MANIFEST_FILE, open_dataset  # noqa: E402

FIRST_STEP = "first step of this start done"


def build_folder(sample: Path, out: Path, classes: int, train: int, val: int) -> float:
    """An ImageNet-shaped folder of hard links to the sample's JPEGs; the seconds it took."""
    t0 = time.perf_counter()
    sources = {split: sorted(str(p) for p in (sample / split).rglob("*.JPEG")) for split in ("train", "val")}
    for split, per_class in (("train", train), ("val", val)):
        files = sources[split]
        for c in range(classes):
            folder = out / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            base = c * per_class
            for i in range(per_class):
                os.link(files[(base + i) % len(files)], folder / f"n{c:08d}_{i}.JPEG")
    return time.perf_counter() - t0


def manifest_times(data: Path, storage: Path) -> dict[str, float]:
    (data / MANIFEST_FILE).unlink(missing_ok=True)
    t0 = time.perf_counter()
    open_dataset(str(data), str(storage), log=lambda line: None)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    open_dataset(str(data), str(storage), log=lambda line: None)
    return {"scan_screen_cold_s": cold, "scan_screen_warm_s": time.perf_counter() - t0}


def _kill_one_worker(driver: psutil.Process) -> None:
    started = driver.create_time()
    workers = [p for p in psutil.process_iter(["cmdline", "create_time"])
               if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] >= started]  # fmt: skip
    if not workers:
        raise SystemExit("no RayTrainWorker of this run found to kill")
    workers[-1].send_signal(signal.SIGKILL)


def launch(data: Path, storage: Path, name: str, restart: bool) -> dict[str, float]:
    """Seconds from launch to the first step, and (with `restart`) from a worker's kill to the next first step."""
    cmd = [
        sys.executable, str(ROOT / "launch.py"), "train", "--recipe", "cpu_demo", "--data", str(data), "--storage", str(storage),
        "--name", name, "--tracking", "off", "--workers", "2", "--max-failures", "3", "--log-every", "1000",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    out: dict[str, float] = {}
    killed_at, lines = None, []
    try:
        for line in proc.stdout:
            lines.append(line)
            if FIRST_STEP not in line:
                continue
            now = time.perf_counter()
            if "first_step_s" not in out:
                out["first_step_s"] = now - t0
                if not restart:
                    break
                _kill_one_worker(psutil.Process(proc.pid))
                killed_at = now
            else:
                out["restart_s"] = now - killed_at
                break
    finally:
        _stop(proc)
    if "first_step_s" not in out or (restart and "restart_s" not in out):
        raise SystemExit(f"{name}: no first step seen:\n{''.join(lines)[-3000:]}")
    return out


def _stop(proc: subprocess.Popen) -> None:
    """The run and its local Ray, whole: Ctrl-C, then the process group."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def measure(data: Path, storage: Path, name: str) -> dict[str, float]:
    result = manifest_times(data, storage)
    (data / MANIFEST_FILE).unlink()
    cold = launch(data, storage, f"{name}-cold", restart=True)
    warm = launch(data, storage, f"{name}-warm", restart=False)
    return {
        **result,
        "launch_cold_s": cold["first_step_s"],
        "restart_s": cold["restart_s"],
        "launch_warm_s": warm["first_step_s"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", default=str(ROOT / "data" / "sample"))
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--train-per-class", type=int, default=1281)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--json", action="store_true")
    opts = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rn50-scale-") as tmp:
        work = Path(tmp)
        sample = work / "sample"
        shutil.copytree(opts.sample, sample, copy_function=os.link, ignore=shutil.ignore_patterns(MANIFEST_FILE))
        big = work / "imagenet-shaped"
        built = build_folder(sample, big, opts.classes, opts.train_per_class, opts.val_per_class)
        files = opts.classes * (opts.train_per_class + opts.val_per_class)
        rows = {"sample": measure(sample, work / "runs", "sample"), "imagenet-shaped": measure(big, work / "runs", "big")}
    result = {"files": files, "build_links_s": built, **rows}
    if opts.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"ImageNet-shaped folder: {files:,} hard links, built in {built:.1f} s")
    print(f"{'figure':>20} | {'sample':>8} | {'imagenet-shaped':>15} | {'ratio':>6}")
    for key in rows["sample"]:
        a, b = rows["sample"][key], rows["imagenet-shaped"][key]
        print(f"{key:>20} | {a:>8.1f} | {b:>15.1f} | {b / a:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
