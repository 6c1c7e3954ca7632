"""What a finished run leaves in MLflow besides metrics: plots and the model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rn50_ray.config import Config
from rn50_ray.core.run_plan import RunPlan, val_size


def lr_curve(cfg: Config, plan: RunPlan) -> list[float]:
    """The LR at every optimizer step, from the very scheduler training uses."""
    from rn50_ray.core import recipe

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=plan.peak_lr)
    sched = recipe.build_scheduler(opt, cfg.schedule, plan.steps_per_epoch)
    lrs = []
    for _ in range(plan.total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def plots(
    cfg: Config, plan: RunPlan, history: list[dict[str, Any]], out: Path, files: dict[str, str] | None = None
) -> list[Path]:
    """Loss and accuracy per epoch, the LR schedule and, where the run folder has it, the val confusion matrix,
    as PNGs."""
    if not history:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train/loss"] for h in history], label="train")
    ax1.plot(epochs, [h["val/loss"] for h in history], label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax1.legend()
    ax2.plot(epochs, [h["val/top1"] for h in history], label="top-1")
    ax2.plot(epochs, [h["val/top5"] for h in history], label="top-5")
    ax2.set(xlabel="epoch", ylabel="val accuracy (%)", title="Accuracy")
    ax2.legend()
    fig.tight_layout()
    curves = out / "loss_accuracy.png"
    fig.savefig(curves, dpi=100)
    plt.close(fig)

    lrs = lr_curve(cfg, plan)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([i / plan.steps_per_epoch for i in range(len(lrs))], lrs)
    ax.set(
        xlabel="epoch", ylabel="learning rate", title=f"LR schedule ({cfg.schedule.kind}, {cfg.schedule.warmup_epochs:g} warmup)"
    )
    fig.tight_layout()
    schedule = out / "lr_schedule.png"
    fig.savefig(schedule, dpi=100)
    plt.close(fig)
    from rn50_ray.core.per_class import CONFUSION_FILE, PER_CLASS_FILE, matrix_from_csv, rows_from_csv

    if not files or CONFUSION_FILE not in files:
        return [curves, schedule]
    return [curves, schedule, confusion_plot(matrix_from_csv(files[CONFUSION_FILE]), rows_from_csv(files[PER_CLASS_FILE]), out)]


def confusion_plot(matrix: list[list[int]], rows: list[dict[str, Any]], out: Path) -> Path:
    """The val confusion matrix as a heat map of row shares (rows: true class), on a log scale; class names on
    the axes where there are few enough to read."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    counts = np.asarray(matrix, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(min(4 + n * 0.35, 14), min(3.5 + n * 0.35, 13)))
    image = ax.imshow(np.where(shares > 0, shares, np.nan), norm=LogNorm(vmin=max(shares[shares > 0].min(), 1e-4), vmax=1),
                      cmap="viridis", interpolation="nearest")  # fmt: skip
    if n <= 40:
        names = [r["name"] for r in rows]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true class", title="Val confusion matrix (share of each true class)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = out / "confusion_matrix.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_model(tracked, cfg: Config, checkpoint: str) -> None:
    """The checkpoint's weights as an MLflow PyTorch model in MLflow's safe `pt2` format (torch.export, no pickle),
    with a dynamic batch dimension: the input example holds 2 images, and MLflow exports the batch dimension of the
    signature it infers from it as dynamic. Registered when tracking.register_model is set."""
    import mlflow
    import mlflow.pytorch

    from rn50_ray.core.checkpoint import load_checkpoint
    from rn50_ray.core.model import build_model, model_kwargs

    state = load_checkpoint(checkpoint)
    model = build_model(**model_kwargs(cfg.model, state["num_classes"], channels_last=False))
    model.load_state_dict(state["model"])
    model.eval()
    size = val_size(cfg.data)  # the input size of the val pipeline
    example = torch.zeros(2, 3, size, size).numpy()  # a batch of 2: torch.export keeps a size-1 dimension static
    before = mlflow.get_tracking_uri() if os.environ.get("MLFLOW_TRACKING_URI") else None
    mlflow.set_tracking_uri(tracked.uri)  # the fluent API has no client argument; it also sets the env var
    client = mlflow.MlflowClient(tracked.uri)
    ended = client.get_run(tracked.run_id).info  # a search logs its best trial's model after the trial ended
    try:
        with mlflow.start_run(run_id=tracked.run_id):
            mlflow.pytorch.log_model(
                model,
                name="model",
                input_example=example,
                serialization_format="pt2",
                registered_model_name=cfg.tracking.register_model or None,
            )
    finally:
        mlflow.set_tracking_uri(before)
        if ended.end_time:  # leaving the block ends the run again: keep its own status and end time
            client.set_terminated(tracked.run_id, ended.status, end_time=ended.end_time)
