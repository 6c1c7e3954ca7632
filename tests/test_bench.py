"""`launch.py bench train | infer | data` in smoke mode (tiny images, a few steps): well-formed tables and
JSON rows that carry the switches asked for; and bench/overhead.py over one turn. No test asserts a speed;
speeds live in docs/PERFORMANCE.md."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, bench_table

from rn50_ray.bench import largest_fitting_batch
from rn50_ray.cli import main
from rn50_ray.errors import UserError

SMOKE = ["--image-size", "32", "--batch-size", "4", "--global-batch", "4", "--steps", "4", "--warmup", "1"]
SMOKE += ["--window", "1", "--loader-workers", "1", "--peak-tflops", "1"]


def _bench(capsys, what: str, data, *extra: str) -> str:
    assert main(["bench", what, "--data", str(data), *SMOKE, *extra]) == 0
    return capsys.readouterr().out


def test_bench_train_prints_a_row_per_backend_and_their_ratios(tiny_data, capsys):
    out = _bench(capsys, "train", tiny_data, "--backends", "synthetic,pytorch,dali-cpu", "--precision", "fp32")
    rows = bench_table(out, "train")
    assert [r["backend"] for r in rows] == ["synthetic", "pytorch", "dali-cpu"]
    for r in rows:
        assert r["precision"] == "fp32" and r["batch"] == "4" and r["compile"] == "False"
        assert float(r["img_per_s"]) > 0 and float(r["step_ms"]) > 0
        assert 0 < float(r["mfu_pct"]) < 100  # against a 1 TFLOP/s peak
        assert r["peak_mem_gib"] == "nan"  # no GPU memory on a CPU
    ratios = re.search(r"^ratios to synthetic: synthetic 1\.00x, pytorch [\d.]+x, dali-cpu [\d.]+x$", out, re.M)
    assert ratios, out


def test_bench_infer_prints_batch_1_latency_percentiles_and_the_largest_batch(tiny_data, capsys):
    out = _bench(capsys, "infer", tiny_data, "--backends", "synthetic", "--max-batch", "12")
    (row,) = bench_table(out, "infer")
    p50, p99 = float(row["b1_p50_ms"]), float(row["b1_p99_ms"])
    assert 0 < p50 <= p99
    assert float(row["img_per_s"]) > 0 and 0 < float(row["mfu_pct"]) < 100
    # Doubling from --batch-size 4 up to --max-batch 12: the throughput is the largest batch's.
    assert row["batch"] == "8" and "synthetic: batches tried 4, 8; the largest that fit: 8" in out, out


def test_the_batch_search_stops_at_the_first_batch_that_runs_out_of_memory():
    # GPU memory cannot run out on this CPU-only machine, so the measurement raises torch's own
    # OutOfMemoryError above 32 images, as a CUDA allocator would.
    def measure(n: int) -> list[float]:
        if n > 32:
            raise torch.OutOfMemoryError(f"CUDA out of memory for {n} images")
        return [n / 1000]

    cpu = torch.device("cpu")
    assert largest_fitting_batch(measure, 8, 1024, cpu) == (32, [0.032], [8, 16, 32, 64])
    assert largest_fitting_batch(measure, 8, 20, cpu) == (16, [0.016], [8, 16])
    assert largest_fitting_batch(measure, 8, 4, cpu) == (8, [0.008], [8])  # a cap below the start: no search
    with pytest.raises(UserError, match="--batch-size: a batch of 64 does not fit"):
        largest_fitting_batch(measure, 64, 1024, cpu)


def test_bench_data_times_the_input_pipelines_alone(tiny_data, capsys):
    # 40 steps: CPU time is counted in 10 ms ticks, and decoding 160 images takes several of them.
    rows = bench_table(_bench(capsys, "data", tiny_data, "--backends", "pytorch,dali-cpu", "--steps", "40"), "data")
    assert [r["backend"] for r in rows] == ["pytorch", "dali-cpu"]
    for r in rows:
        assert float(r["img_per_s"]) > 0 and int(r["steps"]) == 40
        assert float(r["cpu_ms_per_img"]) > 0  # the decoding processes' and threads' CPU time is counted


def test_bench_takes_a_list_of_image_sizes(tiny_data, capsys):
    out = _bench(capsys, "train", tiny_data, "--backends", "synthetic", "--image-sizes", "32", "48")
    tables = out.split("bench train on cpu, ")[1:]
    assert [t.split(" px")[0] for t in tables] == ["32", "48"], out
    assert float(bench_table("bench train on cpu, " + tables[0], "train")[0]["img_per_s"]) > 0


@pytest.mark.parametrize("fmt, channels_last", [("channels_last", True), ("contiguous", False)])
def test_bench_json_rows_carry_the_switches(tiny_data, capsys, fmt, channels_last):
    out = _bench(capsys, "train", tiny_data, "--backends", "synthetic", "--set", f"model.memory_format={fmt}", "--json")
    (row,) = json.loads(out)
    assert row["what"] == "train" and row["channels_last"] is channels_last and row["steps"] == 4
    assert row["img_per_s"] > 0 and math.isclose(row["img_per_s"], 4000 / row["step_ms"], rel_tol=1e-6)


@pytest.mark.ray
def test_overhead_bench_reads_all_three_sides_in_turns():
    # Real processes: a bare loop, a bare TorchTrainer and launch.py train, each on its own local Ray.
    # It proves the bench still parses each side's img/s lines (launch.py's log format included).
    script = Path(__file__).resolve().parent.parent / "bench" / "overhead.py"
    args = ["--no-startup", "--phases", "1", "--phase-s", "3", "--window", "2", "--image-size", "16", "--batch", "4"]
    out = subprocess.run([sys.executable, script, *args, "--json"], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    result = json.loads(out.stdout)
    sides = ["bare loop", "bare TorchTrainer", "launch.py train"]
    assert list(result["img_per_s"]) == sides and all(result["windows_counted"][s] >= 1 for s in sides)
    assert all(len(result["turn_ratios"][s]) == 1 and result["ratio_to_bare_loop"][s] > 0 for s in sides[1:])
    assert result["ratio_launch_to_bare_torchtrainer"] > 0
    assert result["threads"] == max(os.cpu_count() - 1, 1)  # by default one core is left to Ray's processes


BLOCK = "import sys\nfor m in ('ray', 'nvidia', 'nvidia.dali', 'mlflow'): sys.modules[m] = None\n"


def test_bench_runs_without_ray_dali_or_mlflow():
    # What a bare CUDA machine has: bench/gpu_check.py drives this same path.
    code = BLOCK + (
        "from rn50_ray.cli import main\n"
        "sys.exit(main(['bench', 'train', '--backends', 'synthetic', '--image-size', '32', '--batch-size', '4',"
        " '--global-batch', '4', '--steps', '2', '--warmup', '1', '--window', '1', '--peak-tflops', '1', '--json']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["what"] == "train" and row["backend"] == "synthetic" and row["batch"] == 4 and row["steps"] == 2
    assert row["img_per_s"] > 0 and 0 < row["mfu_pct"] < 100


def test_gpu_check_skips_cleanly_without_a_gpu():
    out = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--quick"], capture_output=True, text=True, timeout=300)
    if out.returncode == 0 and out.stdout.startswith("gpu_check on"):
        return  # a CUDA machine: it measured instead
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "skip: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured"


@pytest.mark.slow  # every GPU-check row on the CPU: about 2 minutes
def test_gpu_check_runs_end_to_end_at_toy_sizes_on_the_cpu():
    # Every row of the GPU tables but the compiled ones, on the CPU (DALI kept, for its data row): a bug found
    # here does not cost a GPU session's few minutes. Ray and MLflow are absent, as there.
    code = (
        "import runpy, sys\nfor m in ('ray', 'mlflow'): sys.modules[m] = None\n"
        "sys.argv = ['gpu_check.py', '--cpu-smoke']\nrunpy.run_path('bench/gpu_check.py', run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    tables = {t.split(" on cpu")[0]: t for t in re.split(r"\n(?=bench |resume )", out.stdout)[1:]}
    assert list(tables) == ["bench train", "bench infer", "resume", "bench data"], out.stdout
    train = bench_table(tables["bench train"], "train")
    precisions = [(r["precision"], r["channels_last"]) for r in train]
    assert precisions == [(p, cl) for p in ("fp32", "tf32", "amp-bf16", "amp-fp16") for cl in ("True", "False")]
    assert "ratios to fp32/channels_last: fp32/channels_last 1.00x, fp32/contiguous" in tables["bench train"]
    assert [r["batch"] for r in bench_table(tables["bench infer"], "infer")] == ["8", "8"]
    assert "amp-fp16: batches tried 4, 8; the largest that fit: 8" in tables["bench infer"]
    # The training loop, crashed at step 5 and resumed from its step-4 checkpoint in a new process: the same
    # per-step losses as the uninterrupted run, under bf16 and under fp16 with its loss scaler, EMA on.
    lines = tables["resume"].splitlines()
    header = [c.strip() for c in lines[1].split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.split("|")), strict=True)) for line in lines[2:4]]
    assert [r["precision"] for r in rows] == ["amp-bf16", "amp-fp16"]
    for r in rows:
        assert (r["steps"], r["crash at"], r["resumed from"], r["val batch"]) == ("6", "5", "4", "2"), r
        assert float(r["max loss diff"]) == 0.0 and 0 <= float(r["EMA top1"]) <= 100
    (data,) = bench_table(tables["bench data"], "data")
    assert (data["backend"], data["image_size"], data["batch"]) == ("dali-cpu", "32", "4"), tables["bench data"]


def test_recipe_time_sums_each_epoch_at_its_scheduled_size():
    script = [sys.executable, str(ROOT / "bench" / "recipe_time.py"), "--anchor", "1000", "--images", "60000"]
    out = subprocess.run([*script, "--ratio", "160=2", "--ratio", "192=1.5"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]] for line in out.stdout.splitlines()[2:]}
    assert rows["rn50_90e"] == ["90", "90 at 224", "90", "1.00x"]  # 90 epochs of 60,000 images at 1,000 img/s
    assert rows["rn50_fast_16e"][:3] == ["16", "12 at 160, 4 at 192", f"{(12 * 30 + 4 * 40) / 60:.0f}"]
    missing = subprocess.run([*script, "--ratio", "160=2"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "rn50_fast_16e trains at [192] px: give --ratio for each" in missing.stderr
