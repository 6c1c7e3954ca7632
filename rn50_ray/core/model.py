"""ResNet50 v1.5 (and v1) with state dicts identical to torchvision's `resnet50`."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.resnet import Bottleneck


def build_model(
    *,
    arch: str = "resnet50",
    num_classes: int = 1000,
    conv_init: str = "fan_in",
    zero_init_last_bn: bool = False,
    blurpool: bool = False,
    channels_last: bool = False,
) -> nn.Module:
    """torchvision's resnet50 is v1.5; `resnet50-v1` moves each downsampling stride to conv1. Without
    `blurpool` the state dict is torchvision's, key for key."""
    if arch not in ("resnet50", "resnet50-v1"):
        raise ValueError(f"model.arch: expected resnet50 or resnet50-v1, got {arch!r}")
    model = resnet50(weights=None, num_classes=num_classes, zero_init_residual=zero_init_last_bn)
    if arch == "resnet50-v1":
        for block in model.modules():
            if isinstance(block, Bottleneck) and block.conv2.stride != (1, 1):
                block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):  # NVIDIA uses fan_in; torchvision's own default is fan_out
            nn.init.kaiming_normal_(m.weight, mode=conv_init, nonlinearity="relu")
    if blurpool:
        add_blurpool(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def add_blurpool(module: nn.Module) -> None:
    """FFCV's BlurPool: a 3x3 binomial blur (stride 1, zero padding) before every strided conv with 16 or more
    input channels (all but the stem's), against aliasing. The blur is timm's BlurPool2d, whose filter is a
    non-persistent buffer: the parameters and their count are ResNet50's, under keys `<conv>.1.*`."""
    from timm.layers import BlurPool2d

    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            blur = BlurPool2d(child.in_channels, filt_size=3, stride=1, pad_mode="constant")
            setattr(module, name, nn.Sequential(blur, child))
        else:
            add_blurpool(child)


def model_kwargs(model_cfg, num_classes: int, channels_last: bool) -> dict:
    """Keyword arguments of `build_model` from the `model` config section."""
    return dict(
        arch=model_cfg.arch,
        num_classes=num_classes,
        conv_init=model_cfg.conv_init,
        zero_init_last_bn=model_cfg.zero_init_last_bn,
        blurpool=model_cfg.blurpool,
        channels_last=channels_last,
    )
