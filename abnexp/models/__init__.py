"""Backbones and the model table (one entry per ``model=`` option: builder and schema).

Every model is built from an injected :class:`~abnexp.norm.factory.NormAct` (no model
hard-codes BatchNorm), has the constructor ``(norm_act, num_classes=1000, output_stride=32,
input_3x3=False)`` (the ResNets also ``stem="imagenet"``), an ``out_channels`` attribute, ``forward_features(x)`` ->
(N, out_channels, H/os, W/os), ``forward(x)`` -> (N, num_classes) logits, ``feature_stages()``
-> its stride-4, 8, 16, 32 feature maps (:class:`~abnexp.models.stages.FeatureStage`: tap
module, channels, stride) and ``stem_modules`` (the names before the first stage, or None).
A classification checkpoint initializes a backbone with
:func:`abnexp.models.pretrained.load_backbone`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import TYPE_CHECKING, Callable

from torch import nn

from abnexp.config import ModelConfig

from abnexp.models.blocks import zero_init_residual
from abnexp.models.heads import ClassificationHead
from abnexp.models.resnet import STEMS, ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from abnexp.models.resnext import ResNeXt, resnext50, resnext101, resnext152
from abnexp.models.wideresnet import WideResNet38, wideresnet38

if TYPE_CHECKING:
    from abnexp.norm.factory import NormAct

StemName = Enum("StemName", {name: name for name in STEMS}, type=str)
"""The ``model.stem`` values (the keys of :data:`abnexp.models.resnet.STEMS`), so that an unknown
stem fails at composition listing the valid ones."""


@dataclass
class ResNetOptions(ModelConfig):
    """ResNet's extra key: ``stem`` = the layers before ``layer1`` (:data:`abnexp.models.resnet.STEMS`:
    ``imagenet`` = torchvision's 7x7 stride-2 conv + max-pool, ``small`` = one 3x3 stride-1 conv
    for 28-32 px images, as CIFAR ResNets)."""

    stem: StemName = StemName.imagenet


@dataclass
class ResNeXtOptions(ModelConfig):
    """ResNeXt's extra key: ``input_3x3`` = three 3×3 convolutions in the stem instead of one 7×7
    (the InPlace-ABN reference models' ``input_3x3``)."""

    input_3x3: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """One ``model=`` option: ``builder(norm_act, num_classes=..., **options)`` -> the model; ``options``:
    its schema (keys beyond name and pretrained are the builder's keyword arguments)."""

    builder: Callable[..., nn.Module]
    options: type = ModelConfig

    def builder_keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.options) if f.name not in ("name", "pretrained"))


MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(resnet18, ResNetOptions),
    "resnet34": ModelSpec(resnet34, ResNetOptions),
    "resnet50": ModelSpec(resnet50, ResNetOptions),
    "resnet101": ModelSpec(resnet101, ResNetOptions),
    "resnet152": ModelSpec(resnet152, ResNetOptions),
    "resnext50": ModelSpec(resnext50, ResNeXtOptions),
    "resnext101": ModelSpec(resnext101, ResNeXtOptions),
    "resnext152": ModelSpec(resnext152, ResNeXtOptions),
    "wideresnet38": ModelSpec(wideresnet38),
}
"""model name -> its entry (the ``model=`` options of configs/model/)."""


def build_model(name: str, norm_act: "NormAct", num_classes: int, **options) -> nn.Module:
    """Build the model ``name`` (a key of :data:`MODELS`) with the given norm factory.

    Args:
        options: keys of the model's schema (output_stride, input_3x3 for ResNeXt, ...); missing
            keys take the builder's defaults. A composed ``cfg.model`` passes as
            ``build_model(norm_act=..., num_classes=..., **model_options(cfg.model))``.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names), an option the model does
            not have, an invalid ``output_stride`` (valid: 8, 16, 32), or ``zero_init_residual``
            with a norm whose γ cannot be 0 (:func:`~abnexp.models.blocks.zero_init_residual`).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    spec = MODELS[name]
    unknown = sorted(set(options) - set(spec.builder_keys()))
    if unknown:
        raise ValueError(f"model={name} has no option {', '.join(unknown)}; its options: {', '.join(spec.builder_keys())}")
    zero_residual = options.pop("zero_init_residual", False)
    model = spec.builder(norm_act, num_classes=num_classes, **options)
    if zero_residual:
        zero_init_residual(model)
    return model


def model_options(model_cfg) -> dict:
    """``build_model``'s arguments from a composed ``cfg.model`` (name and the builder's keys)."""
    return {"name": model_cfg.name, **{k: model_cfg[k] for k in MODELS[model_cfg.name].builder_keys()}} \
        if model_cfg.name in MODELS else {"name": model_cfg.name}


__all__ = ["MODELS", "ModelSpec", "ResNetOptions", "ResNeXtOptions", "StemName", "build_model", "model_options", "ClassificationHead", "ResNet", "ResNeXt", "WideResNet38",
           "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50",
           "resnext101", "resnext152", "wideresnet38"]
