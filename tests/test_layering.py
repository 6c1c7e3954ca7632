"""The core imports neither ray nor nvidia.dali: it must run on a bare GPU machine."""

import json
import subprocess
import sys

from conftest import ROOT, bench_table

CORE = [
    "rn50_ray.core.model",
    "rn50_ray.core.recipe",
    "rn50_ray.core.step",
    "rn50_ray.core.state",
    "rn50_ray.core.context",
    "rn50_ray.core.loop",
    "rn50_ray.config",
    "rn50_ray.data",
    "rn50_ray.data.synthetic",
    "rn50_ray.data.pytorch",
]


def test_core_imports_without_ray_or_dali():
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['nvidia'] = None; sys.modules['nvidia.dali'] = None\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "print('ok', [m for m in sys.modules if m.startswith(('ray', 'nvidia')) and sys.modules[m] is not None])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok []"


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


def test_gpu_check_runs_end_to_end_at_toy_sizes_on_the_cpu():
    # Every row of the GPU table but the compiled ones, on the CPU (DALI kept, for its data row): a bug
    # found here does not cost a GPU session's few minutes. Ray and MLflow are absent, as there.
    code = (
        "import runpy, sys\nfor m in ('ray', 'mlflow'): sys.modules[m] = None\n"
        "sys.argv = ['gpu_check.py', '--cpu-smoke']\nrunpy.run_path('bench/gpu_check.py', run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    tables = {t.split(" on cpu")[0]: "bench " + t for t in out.stdout.split("\nbench ")[1:]}
    assert list(tables) == ["train", "infer", "data"], out.stdout
    train = bench_table(tables["train"], "train")
    precisions = [(r["precision"], r["channels_last"]) for r in train]
    assert precisions == [(p, cl) for p in ("fp32", "tf32", "amp-bf16", "amp-fp16") for cl in ("True", "False")]
    assert "ratios to fp32/channels_last: fp32/channels_last 1.00x, fp32/contiguous" in tables["train"]
    assert [r["batch"] for r in bench_table(tables["infer"], "infer")] == ["8", "8"]
    assert "amp-fp16: batches tried 4, 8; the largest that fit: 8" in tables["infer"]
    (data,) = bench_table(tables["data"], "data")
    assert (data["backend"], data["image_size"], data["batch"]) == ("dali-cpu", "32", "4"), tables["data"]
