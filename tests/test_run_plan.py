"""The run plan: every number a run derives from its config has one formula (core/run_plan.py), dry-run and the
training log print the same numbers for every shipped recipe, and the run name follows what shapes the result."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, launch

from rn50_ray.config import load_config, resolve
from rn50_ray.core.run_plan import plan_run

RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
IMAGENET = 1_281_167

# Each derived number's rule, as code would spell it again outside run_plan.py.
SECOND_FORMULAS = {
    "peak LR": r"lr_per_256\s*\*",
    "global batch": r"global_size\s+or\b|per_worker\s*\*\s*\w*max_workers",
    "steps per epoch": r"//\s*[\w.]*global_(size|batch)",
    "val size": r"val_image_size\s+or\b",
    "val batch": r"val_batch\s+or\b",
    "resolution schedule": r"ResolutionSchedule\(",
    "batch split": r"BatchPlan\(",
}


@pytest.mark.parametrize("number", sorted(SECOND_FORMULAS))
def test_no_derived_number_has_a_second_formula(number):
    home = {ROOT / "rn50_ray" / "core" / "run_plan.py", ROOT / "rn50_ray" / "core" / "batching.py"}
    found = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in sorted((ROOT / "rn50_ray").rglob("*.py"))
        if p not in home
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(SECOND_FORMULAS[number], line)
    ]
    assert not found, f"{number} worked out outside core/run_plan.py:\n" + "\n".join(found)


def test_nvidias_90_epoch_plan_on_imagenet():
    plan = plan_run(resolve(load_config([str(ROOT / "recipes" / "rn50_90e.yaml")])), IMAGENET, world_size=8)
    assert (plan.global_batch, plan.batch.share(0), plan.batch.accum(0), plan.steps_per_epoch) == (2048, 256, 1, 625)
    assert plan.peak_lr == pytest.approx(2.048) and plan.total_steps == 90 * 625
    assert (plan.sizes.at(0), plan.val_size, plan.val_batch) == (224, 224, 256)


def test_the_plan_for_w_workers_is_a_pure_function_of_w():
    plan = plan_run(resolve(load_config([str(ROOT / "recipes" / "rn50_90e.yaml")])), IMAGENET)
    assert plan.for_world(3).for_world(9) == plan.for_world(9)
    nine = plan.for_world(9).batch
    assert [nine.share(r) for r in range(9)] == [228, 228, 228, 228, 228, 227, 227, 227, 227]
    assert plan.for_world(9).steps_per_epoch == plan.steps_per_epoch  # the global batch, and so the epoch, is fixed


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+(?:\.\d+)?", text)


@pytest.mark.parametrize("recipe", RECIPES)
def test_dry_run_and_the_training_log_print_the_same_plan(recipe, sample_data, tmp_path):
    args = ["--recipe", recipe, "--data", sample_data, "--global-batch", "64", "--batch-size", "16", "--workers", "1:3"]
    out = launch("train", *args, "--storage", tmp_path, "--dry-run")
    assert out.returncode == 0, out.stderr
    rows = {
        int(m[1]): m.groups()[1:]
        for m in re.finditer(r"^\s+(\d+) \|\s+([\d-]+) \|\s+(\d+) \|\s+(\d+) \|\s+(\d+)$", out.stdout, re.M)
    }
    assert sorted(rows) == [1, 2, 3], out.stdout
    # What a worker logs at its start ("plan: ..." in core/loop.py), from the same config at each world size.
    cfg = resolve(load_config([str(ROOT / "recipes" / f"{recipe}.yaml")], {
        "data.path": str(sample_data), "batch.global_size": 64, "batch.per_worker": 16, "scale.workers": "1:3"}))  # fmt: skip
    for w, (images, micro, accum, steps) in rows.items():
        logged = plan_run(cfg, 1000, w).describe()
        assert f"= {w} workers x {images} images (micro-batch {micro}, {accum} accumulation); {steps} steps per epoch" in logged
        peak = re.search(r"peak LR ([\d.]+) \(", out.stdout)[1]
        assert f"peak LR {peak};" in logged
        size = re.search(r"^train size: (.*?); val size (\d+) px", out.stdout, re.M)
        assert f"train size {size[1]}; val {size[2]} px" in logged


def test_a_rerun_with_another_worker_count_resumes_only_where_the_global_batch_is_fixed():
    def name(workers, *global_batch):
        overrides = {"scale.workers": workers, **({"batch.global_size": global_batch[0]} if global_batch else {})}
        return resolve(load_config([], overrides)).run.name

    # No global batch given: it is batch.per_worker x MAX workers, so another MAX is another global batch (another
    # update, another result): another run, under another name, never a refusal of the old one.
    assert name("2") != name("4") and name("2:4") == name("4") and name("1:4") == name("4")
    # A fixed global batch (every shipped recipe has one): the same run at any worker count.
    assert name("2", 512) == name("4", 512) == name("8:16", 512)
