"""ResNet v1 (post-activation) 18/34/50/101/152 built from an injected :class:`NormAct`.

Source: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), in
torchvision's layout (``torchvision.models.resnet``, the "v1.5" variant with the stride on
the 3x3 convolution of bottleneck blocks). Module and parameter/buffer names are exactly
torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0/1``, ``fc``),
so with ``build_norm_act("bn", activation="relu")`` a torchvision state dict loads with
``strict=True`` and gives the same outputs.

Blocks are post-activation: conv -> norm_act -> ... -> conv -> norm (identity activation),
plus the shortcut, then a standalone activation, in place on the fresh sum as torchvision's
``relu(inplace=True)`` (autograd keeps the block output only, not the sum too). The sum is out of
place, since the last norm may keep its output (InPlace-ABN). Norm layers only ever see
convolution outputs, so in-place norms (InPlace-ABN) are safe here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from abnexp.models.blocks import ResidualBlock, check_output_stride, init_conv_weights, reject_input_3x3
from abnexp.models.heads import ClassificationHead
from abnexp.models.stages import FeatureStage, stage_strides

if TYPE_CHECKING:
    from abnexp.norm.factory import NormAct

# output stride -> torchvision's replace_stride_with_dilation for layer2, layer3, layer4
_DILATE = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}


@dataclass(frozen=True)
class Stem:
    """The layers before ``layer1``: ``conv1`` (``kernel`` x ``kernel``, ``stride``, 64 channels) +
    ``bn1``, then a 3x3 stride-2 max-pool if ``max_pool`` (else ``maxpool`` is an identity, so
    module and parameter names stay torchvision's). ``reduction``: input pixels per ``layer1``
    pixel."""

    kernel: int
    stride: int
    max_pool: bool

    @property
    def reduction(self) -> int:
        return self.stride * (2 if self.max_pool else 1)


STEMS: dict[str, Stem] = {
    "imagenet": Stem(7, 2, True),  # He et al. 2016, Table 1 (torchvision): 224 px -> 56 px at layer1
    "small": Stem(3, 1, False),  # He et al. 2016, §4.2 (CIFAR-10, 32 px) and the usual CIFAR ResNet-18: no downsampling
    "small_pool": Stem(3, 1, True),  # the 3x3 conv, then torchvision's max-pool: half the resolution, 1/4 of the compute
}
"""``model.stem`` -> its layers. ``small`` keeps 28-32 px images at full resolution in ``layer1``
(4x4 maps after ``layer4`` at 28 px, where ``imagenet`` leaves 1x1); ``small_pool`` halves it
(2x2 after ``layer4``)."""


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions: (N, in, H, W) -> (N, planes, H/stride, W/stride).

    Unlike torchvision, dilation > 1 is supported (both 3x3 convolutions are dilated), so
    ResNet-18/34 also run at output stride 16 / 8.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None, norm_act: "NormAct") -> None:
        super().__init__()
        conv = norm_act.conv
        self.conv1 = conv(inplanes, planes, 3, stride=stride, padding=dilation,
                          dilation=dilation, bias=False)
        self.bn1 = norm_act(planes, conv=self.conv1)
        self.conv2 = conv(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_act(planes, activation="identity", conv=self.conv2)
        self.downsample = downsample
        self.act = norm_act.activation_module(inplace=True)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.act(out + shortcut)


class Bottleneck(ResidualBlock):
    """1x1 -> 3x3 (stride, dilation) -> 1x1: (N, in, H, W) -> (N, 4*planes, H/s, W/s)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None, norm_act: "NormAct") -> None:
        super().__init__()
        conv = norm_act.conv
        self.conv1 = conv(inplanes, planes, 1, bias=False)
        self.bn1 = norm_act(planes, conv=self.conv1)
        self.conv2 = conv(planes, planes, 3, stride=stride, padding=dilation,
                          dilation=dilation, bias=False)
        self.bn2 = norm_act(planes, conv=self.conv2)
        self.conv3 = conv(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_act(planes * self.expansion, activation="identity", conv=self.conv3)
        self.downsample = downsample
        self.act = norm_act.activation_module(inplace=True)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(out))
        return self.act(out + shortcut)


class ResNet(nn.Module):
    """ResNet v1 backbone + classifier.

    Shapes: ``forward_features``: (N, 3, H, W) -> (N, out_channels, H/os, W/os) with
    os = ``output_stride`` x stem reduction / 4 (ceil division at each stride; os = ``output_stride``
    with the default ``imagenet`` stem, ``output_stride`` / 4 with ``small``); ``forward``: ->
    (N, num_classes).

    Feature stages (:meth:`feature_stages`): the outputs of ``layer1`` .. ``layer4``; the stem
    (:attr:`stem_modules`) is ``conv1`` + ``bn1`` (the max-pool has no parameters).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in layer1..layer4.
        norm_act: normalization + activation factory.
        num_classes: logits of the linear classifier ``fc``.
        output_stride: 32, 16 or 8; 16 / 8 replace the stride of layer4 / layer3+layer4 by
            dilation exactly like torchvision's ``replace_stride_with_dilation``.
        input_3x3: not supported (ValueError if True).
        name: model name used in error messages.
        stem: a key of :data:`STEMS` (ValueError otherwise, listing them).
    """

    stem_modules = ("conv1", "bn1")
    """Top-level children with parameters before ``layer1`` (torchvision's first trainable layer)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 norm_act: "NormAct", num_classes: int = 1000, output_stride: int = 32,
                 input_3x3: bool = False, name: str = "resnet", stem: str = "imagenet") -> None:
        super().__init__()
        reject_input_3x3(name, input_3x3)
        check_output_stride(output_stride)
        if len(layers) != 4:
            raise ValueError(f"layers must contain four values, got {list(layers)}")
        if stem not in STEMS:
            raise ValueError(f"model.stem={stem!r} is not a stem; valid: {', '.join(STEMS)}")
        self.output_stride = output_stride
        self.stem = STEMS[stem]
        self.inplanes = 64
        self.dilation = 1
        k = self.stem.kernel
        self.conv1 = norm_act.conv(3, 64, k, stride=self.stem.stride, padding=k // 2, bias=False)
        self.bn1 = norm_act(64, conv=self.conv1)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if self.stem.max_pool else nn.Identity()
        dilate = _DILATE[output_stride]
        self.layer1 = self._make_layer(block, 64, layers[0], 1, False, norm_act)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, dilate[0], norm_act)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, dilate[1], norm_act)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, dilate[2], norm_act)
        self.out_channels = 512 * block.expansion
        self.fc = ClassificationHead(self.out_channels, num_classes)
        init_conv_weights(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, dilate: bool,
                    norm_act: "NormAct") -> nn.Sequential:
        """torchvision's ``_make_layer``: the first block keeps the previous dilation."""
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            proj = norm_act.conv(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False)
            downsample = nn.Sequential(proj, norm_act(planes * block.expansion, activation="identity", conv=proj))
        layers = [block(self.inplanes, planes, stride, previous_dilation, downsample, norm_act)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, 1, self.dilation, None, norm_act))
        return nn.Sequential(*layers)

    def feature_stages(self) -> tuple[FeatureStage, ...]:
        """C2..C5: ``layer1`` .. ``layer4`` outputs (post-activation blocks end in the activation),
        channels 64, 128, 256, 512 times the block expansion (1 basic, 4 bottleneck), strides 4, 8,
        16, 32 pixels at output stride 32 with the ``imagenet`` stem, 1, 2, 4, 8 with ``small``
        (see :class:`~abnexp.models.stages.FeatureStage`)."""
        scale = self.stem.reduction
        return tuple(FeatureStage(f"layer{i}", self.out_channels >> (4 - i), stride * scale // 4, (f"layer{i}",))
                     for i, stride in enumerate(stage_strides(self.output_stride), start=1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, out_channels, H/os, W/os)."""
        x = self.maxpool(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> logits (N, num_classes)."""
        return self.fc(self.forward_features(x))


def resnet18(norm_act: "NormAct", num_classes: int = 1000, output_stride: int = 32,
             input_3x3: bool = False, stem: str = "imagenet") -> ResNet:
    """ResNet-18: BasicBlock, [2, 2, 2, 2], out_channels 512."""
    return ResNet(BasicBlock, [2, 2, 2, 2], norm_act, num_classes, output_stride, input_3x3,
                  "resnet18", stem)


def resnet34(norm_act: "NormAct", num_classes: int = 1000, output_stride: int = 32,
             input_3x3: bool = False, stem: str = "imagenet") -> ResNet:
    """ResNet-34: BasicBlock, [3, 4, 6, 3], out_channels 512."""
    return ResNet(BasicBlock, [3, 4, 6, 3], norm_act, num_classes, output_stride, input_3x3,
                  "resnet34", stem)


def resnet50(norm_act: "NormAct", num_classes: int = 1000, output_stride: int = 32,
             input_3x3: bool = False, stem: str = "imagenet") -> ResNet:
    """ResNet-50: Bottleneck, [3, 4, 6, 3], out_channels 2048 (25,557,032 params at 1000)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], norm_act, num_classes, output_stride, input_3x3,
                  "resnet50", stem)


def resnet101(norm_act: "NormAct", num_classes: int = 1000, output_stride: int = 32,
              input_3x3: bool = False, stem: str = "imagenet") -> ResNet:
    """ResNet-101: Bottleneck, [3, 4, 23, 3], out_channels 2048."""
    return ResNet(Bottleneck, [3, 4, 23, 3], norm_act, num_classes, output_stride, input_3x3,
                  "resnet101", stem)


def resnet152(norm_act: "NormAct", num_classes: int = 1000, output_stride: int = 32,
              input_3x3: bool = False, stem: str = "imagenet") -> ResNet:
    """ResNet-152: Bottleneck, [3, 8, 36, 3], out_channels 2048."""
    return ResNet(Bottleneck, [3, 8, 36, 3], norm_act, num_classes, output_stride, input_3x3,
                  "resnet152", stem)
