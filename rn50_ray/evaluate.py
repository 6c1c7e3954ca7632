"""`evaluate`: a checkpoint's top-1, top-5 and loss on the val split, in one process without Ray."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rn50_ray import run_folder
from rn50_ray.config import Config
from rn50_ray.core.batching import plan_batches
from rn50_ray.core.checkpoint import load_checkpoint
from rn50_ray.core.evaluation import evaluate
from rn50_ray.core.model import build_model, model_kwargs
from rn50_ray.core.per_class import per_class_rows
from rn50_ray.core.recipe import WeightEMA
from rn50_ray.core.step import resolve_precision
from rn50_ray.core.trainer import input_format
from rn50_ray.data.loaders import make_loaders
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
) -> dict[str, Any]:
    """`path` is a checkpoint folder (or its state.pt), local or a storage URI (s3://...). The val pipeline,
    its size and flip TTA are the run's unless given."""
    dev = pick_device(device)
    with run_folder.local_copy(path) as local:
        state = load_checkpoint(local)
    cfg = Config.from_dict(state["config"], source=f"{path} (stored config)")
    data_cfg = dataclasses.replace(
        cfg.data,
        path=data or cfg.data.path,
        loader_workers=workers,
        val_image_size=image_size or cfg.data.val_image_size,
        val_batch=batch_size,
        # the val pipeline training used, on this device (dali-cpu without a GPU)
        backend="auto" if cfg.data.backend.startswith("dali") else cfg.data.backend,
    )
    flip = cfg.eval.flip_tta if flip_tta is None else flip_tta
    layout = input_format(cfg, dev)  # the batches training's validation had
    plan = plan_batches(batch_size, 1, batch_size)
    loaders = make_loaders(data_cfg, Shard(0, 1, dev), plan, seed=cfg.system.seed, **layout)
    num_classes = state["num_classes"]
    model = build_model(**model_kwargs(cfg.model, num_classes, layout["channels_last"])).to(dev)
    model.load_state_dict(state["model"])
    precision = resolve_precision(cfg.system.precision, dev)
    result: dict[str, Any] = evaluate(model, loaders.val.batches(), num_classes, precision, dev, flip, confusion=True)
    result["per_class"] = per_class_rows(result.pop("confusion"), loaders.classes, loaders.class_names)
    result.update(
        images=loaders.val_size,
        image_size=data_cfg.val_image_size or data_cfg.image_size,
        flip_tta=flip,
        epoch=state["progress"]["epoch"],
        step=state["progress"]["step"],
    )
    if state.get("ema"):
        ema = WeightEMA(model, cfg.optim.ema_decay or 0.9999)
        ema.load_state_dict(state["ema"])
        ema_result = evaluate(ema.module, loaders.val.batches(), num_classes, precision, dev, flip)
        result.update({f"ema_{k}": v for k, v in ema_result.items()})
    return result
