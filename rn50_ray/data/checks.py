"""What a command checks of its data before anything starts: the folder's manifest (read, or built once), the
files the chosen backend cannot use (an error naming the first, or left out under --skip-bad-images), and that
the rest fills the run's plan. The driver, a search, dry-run and bench call it; the workers only read what it
settled (`worker_dataset`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rn50_ray.core.run_plan import PlanError, RunPlan, plan_run
from rn50_ray.data.backends import uses_dali
from rn50_ray.data.manifest import open_dataset, read_dataset
from rn50_ray.data.screen import bad_image_error
from rn50_ray.data.types import Dataset
from rn50_ray.errors import ConfigError, DataError


def plan_for(cfg, dataset: Dataset | None, world_size: int = 1) -> RunPlan:
    """The run's plan over this dataset (None: synthetic), a DataError naming the folder where it is too small."""
    try:
        return plan_run(cfg, len(dataset.train) if dataset else None, world_size)
    except PlanError as e:
        raise DataError(f"{dataset.train.root}: {e}") from None


def usable_dataset(cfg, *, rescan: bool = False, log: Callable[[str], None] = print) -> Dataset | None:
    """The data folder's listing for this config, less the files its backend cannot use where the config allows
    leaving them out; None for the synthetic backend. Raises a DataError or ConfigError on bad data."""
    if cfg.data.backend == "synthetic":
        return None
    dataset = open_dataset(cfg.data.path, cfg.run.storage, rescan=rescan, screen=cfg.data.screen_images, log=log)
    bad = dataset.unusable(dali=uses_dali(cfg.data.backend))
    if bad and not cfg.data.skip_bad_images:
        raise bad_image_error({f"{dataset.root}/{p}": why for p, why in bad.items()})
    dataset = dataset.without(bad)
    plan_for(cfg, dataset)
    if cfg.model.num_classes and cfg.model.num_classes < len(dataset.train.classes):
        raise ConfigError(
            f"model.num_classes: expected at least the {len(dataset.train.classes)} classes of "
            f"{cfg.data.path}, got {cfg.model.num_classes}"
        )
    return dataset


def dataset_ref(dataset: Dataset | None) -> dict[str, Any] | None:
    """What the workers need to read the same listing: where its manifest is, and which version of it."""
    return None if dataset is None else {"manifest": dataset.manifest, "id": dataset.manifest_id, "root": dataset.root}


def worker_dataset(ref: dict[str, Any] | None, cfg) -> Dataset | None:
    """A worker's listing: the manifest its driver checked, less the same files (the same rule on the same
    manifest); never a scan."""
    if ref is None:
        return None
    dataset = read_dataset(ref["manifest"], ref["root"], ref["id"])
    return dataset.without(dataset.unusable(dali=uses_dali(cfg.data.backend))) if cfg.data.skip_bad_images else dataset
