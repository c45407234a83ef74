"""Backbones and the model registry.

Every model is built from an injected :class:`~abnexp.norm.factory.NormAct` (no model
hard-codes BatchNorm), has the constructor ``(norm_act, num_classes=1000, output_stride=32,
input_3x3=False)``, an ``out_channels`` attribute, ``forward_features(x)`` ->
(N, out_channels, H/os, W/os) and ``forward(x)`` -> (N, num_classes) logits.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import nn

from abnexp.models.heads import ClassificationHead
from abnexp.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from abnexp.models.resnext import ResNeXt, resnext50, resnext101, resnext152
from abnexp.models.wideresnet import WideResNet38, wideresnet38

if TYPE_CHECKING:
    from abnexp.norm.factory import NormAct

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "resnext50": resnext50,
    "resnext101": resnext101,
    "resnext152": resnext152,
    "wideresnet38": wideresnet38,
}


def build_model(name: str, norm_act: "NormAct", num_classes: int, output_stride: int = 32,
                input_3x3: bool = False) -> nn.Module:
    """Build the model ``name`` (a key of :data:`MODELS`) with the given norm factory.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names), an invalid
            ``output_stride`` (valid: 8, 16, 32), or ``input_3x3=True`` for a model other
            than ResNeXt.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name](norm_act, num_classes=num_classes, output_stride=output_stride,
                        input_3x3=input_3x3)


__all__ = ["MODELS", "build_model", "ClassificationHead", "ResNet", "ResNeXt", "WideResNet38",
           "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50",
           "resnext101", "resnext152", "wideresnet38"]
