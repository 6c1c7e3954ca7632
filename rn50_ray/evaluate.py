"""`evaluate`: a checkpoint's top-1, top-5 and loss on the val split, in one process without Ray. The val split
comes from the data folder's manifest (built once if the folder has none); no train pipeline is built."""

from __future__ import annotations

from typing import Any

import torch

from rn50_ray import run_folder
from rn50_ray.config import Config
from rn50_ray.core.checkpoint import load_checkpoint
from rn50_ray.core.evaluation import evaluate
from rn50_ray.core.model import build_model, model_kwargs
from rn50_ray.core.per_class import per_class_rows
from rn50_ray.core.recipe import WeightEMA
from rn50_ray.core.run_plan import plan_run
from rn50_ray.core.step import resolve_precision
from rn50_ray.core.trainer import input_format
from rn50_ray.data.backends import uses_dali
from rn50_ray.data.loaders import make_val_batches
from rn50_ray.data.manifest import open_dataset
from rn50_ray.data.types import Shard


def pick_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`. A CUDA device always carries its index: DALI's GPU
    pipelines take it as device_id, and a bare `cuda` would leave them CPU-only."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def evaluate_checkpoint(
    path: str,
    *,
    data: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    workers: int = 2,
    flip_tta: bool | None = None,
    image_size: int | None = None,
    rescan: bool = False,
) -> dict[str, Any]:
    """`path` is a checkpoint folder (or its state.pt), local or a storage URI (s3://...). The val pipeline,
    its size and flip TTA are the run's unless given."""
    dev = pick_device(device)
    with run_folder.local_copy(path) as local:
        state = load_checkpoint(local)
    stored = Config.from_dict(state["config"], source=f"{path} (stored config)")
    flip = stored.eval.flip_tta if flip_tta is None else flip_tta
    backend = stored.data.backend
    cfg = stored.with_overrides(
        {
            "data.path": data or stored.data.path,
            "data.loader_workers": workers,
            "data.val_image_size": image_size or stored.data.val_image_size,
            "data.val_batch": batch_size,
            # the val pipeline training used, on this device (dali-cpu without a GPU); a data folder, not noise
            "data.backend": "auto" if backend.startswith("dali") or backend == "synthetic" else backend,
            "scale.workers": "1",
            "batch.global_size": 1,
        },
        "evaluate",
    )
    dataset = open_dataset(cfg.data.path, stored.run.storage, rescan=rescan, screen=cfg.data.screen_images)
    val = dataset.val.without(dataset.unusable(dali=uses_dali(cfg.data.backend)))
    plan = plan_run(cfg, len(dataset.train))
    layout = input_format(cfg, dev)  # the batches training's validation had
    batches = make_val_batches(cfg, Shard(0, 1, dev), plan, val, **layout)
    num_classes = state["num_classes"]
    model = build_model(**model_kwargs(cfg.model, num_classes, layout["channels_last"])).to(dev)
    model.load_state_dict(state["model"])
    precision = resolve_precision(cfg.system.precision, dev)
    result: dict[str, Any] = evaluate(model, batches.batches(), num_classes, precision, dev, flip, confusion=True)
    result["per_class"] = per_class_rows(result.pop("confusion"), val.classes, val.names)
    result.update(
        images=len(val), image_size=plan.val_size, flip_tta=flip, epoch=state["progress"]["epoch"], step=state["progress"]["step"]
    )
    if state.get("ema"):
        ema = WeightEMA(model, cfg.optim.ema_decay or 0.9999)
        ema.load_state_dict(state["ema"])
        ema_result = evaluate(ema.module, batches.batches(), num_classes, precision, dev, flip)
        result.update({f"ema_{k}": v for k, v in ema_result.items()})
    return result
