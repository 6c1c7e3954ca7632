"""`evaluate`: a checkpoint's top-1, top-5 and loss on the val split, in one process without Ray."""

from __future__ import annotations

from typing import Any

import torch

from rn50_ray.config import Config
from rn50_ray.core.loop import evaluate, input_format
from rn50_ray.core.model import build_model, model_kwargs
from rn50_ray.core.state import load_checkpoint
from rn50_ray.core.step import resolve_precision
from rn50_ray.data import Shard, make_loaders


def pick_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`. A CUDA device always carries its index: DALI's GPU
    pipelines take it as device_id, and a bare `cuda` would leave them CPU-only."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def evaluate_checkpoint(
    path: str, *, data: str | None = None, batch_size: int = 64, device: str = "auto", workers: int = 2
) -> dict[str, Any]:
    dev = pick_device(device)
    state = load_checkpoint(path, map_location=dev)
    cfg = Config.from_dict(state["config"], source=f"{path} (stored config)")
    data_cfg = cfg.data
    data_cfg.path = data or data_cfg.path
    data_cfg.loader_workers = workers
    if data_cfg.backend.startswith("dali"):
        data_cfg.backend = "auto"  # the val pipeline training used, on this device (dali-cpu without a GPU)
    layout = input_format(cfg, dev)  # the batches training's validation had
    loaders = make_loaders(data_cfg, Shard(0, 1, dev), batch_size, global_batch=batch_size, seed=cfg.system.seed, **layout)
    num_classes = state["num_classes"]
    model = build_model(**model_kwargs(cfg.model, num_classes, layout["channels_last"])).to(dev)
    model.load_state_dict(state["model"])
    precision = resolve_precision(cfg.system.precision, dev)
    result: dict[str, Any] = evaluate(model, loaders.val.batches(), num_classes, precision, dev)
    result.update(images=loaders.val_size, epoch=state["progress"]["epoch"], step=state["progress"]["step"])
    if state.get("ema"):
        from torch.optim.swa_utils import AveragedModel

        ema = AveragedModel(model, use_buffers=True)
        ema.load_state_dict(state["ema"])
        ema_result = evaluate(ema.module, loaders.val.batches(), num_classes, precision, dev)
        result.update({f"ema_{k}": v for k, v in ema_result.items()})
    return result
