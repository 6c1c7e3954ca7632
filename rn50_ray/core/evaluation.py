"""Evaluation: top-1, top-5 and loss over the val batches (flip TTA where asked), and the confusion matrix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rn50_ray.core.step import Precision, eval_step


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches,
    num_classes: int,
    precision: Precision,
    device: torch.device,
    flip_tta: bool = False,
    confusion: bool = False,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Top-1, top-5 (in %) and loss over this rank's batches, summed over all ranks by torchmetrics. With
    `flip_tta`, on the mean of the logits of each image and its mirror image; with `confusion`, also the
    confusion matrix (rows: true class, columns: predicted), as lists. `reduce` sums a tensor over the ranks
    where torch.distributed does not span them (replica groups): every metric state here is a sum, so summing
    each is the sync."""
    # Imported here: torchmetrics is slow to import, and only evaluation needs it.
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

    was_training = model.training
    model.eval()
    top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro").to(device)
    loss = MeanMetric().to(device)
    matrix = MulticlassConfusionMatrix(num_classes).to(device) if confusion else None
    for images, labels in batches:
        logits = eval_step(model, images, precision)
        if flip_tta:
            logits = (logits + eval_step(model, images.flip(3), precision)) / 2
        top1.update(logits, labels)
        top5.update(logits, labels)
        loss.update(F.cross_entropy(logits, labels), weight=labels.numel())
        if matrix is not None:
            matrix.update(logits, labels)
    model.train(was_training)
    if reduce is not None:
        for metric in (top1, top5, loss, matrix):
            for name, value in metric.metric_state.items() if metric is not None else ():
                setattr(metric, name, reduce(value).to(value.dtype))
    result: dict[str, Any] = {
        "top1": 100 * top1.compute().item(),
        "top5": 100 * top5.compute().item(),
        "loss": loss.compute().item(),
    }
    if matrix is not None:
        result["confusion"] = matrix.compute().tolist()
    return result
