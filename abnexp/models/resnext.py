"""Pre-activation ResNeXt 50/101/152 as used in the InPlace-ABN paper.

Sources: Xie et al., "Aggregated Residual Transformations for Deep Neural Networks"
(CVPR 2017); Rota Bulò et al., "In-Place Activated BatchNorm for Memory-Optimized Training
of DNNs" (CVPR 2018) and its reference library (mapillary/inplace_abn, ``models/resnext.py``):
identity-mapping blocks (:class:`~abnexp.models.blocks.IdentityResidualBlock`), cardinality
64, stage channels (128, 128, 256) doubling per stage, a final ``bn_out`` norm-act before
global average pooling + linear.

Module names: ``mod1`` (stem), ``mod2`` .. ``mod5`` (stages, blocks ``block1`` ..),
``bn_out``, ``classifier``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from abnexp.models.blocks import IdentityResidualBlock, check_output_stride, init_conv_weights
from abnexp.models.heads import ClassificationHead
from abnexp.models.stages import FeatureStage, stage_strides

if TYPE_CHECKING:
    from abnexp.norm.factory import NormAct

# output stride -> (stride, dilation) of mod2..mod5; a dilated stage dilates all its blocks
_STAGES = {
    32: ((1, 1), (2, 1), (2, 1), (2, 1)),
    16: ((1, 1), (2, 1), (2, 1), (1, 2)),
    8: ((1, 1), (2, 1), (1, 2), (1, 4)),
}


class ResNeXt(nn.Module):
    """Pre-activation ResNeXt backbone + classifier.

    Stem (``mod1``, as the reference library): 7x7/2 conv (64) -> 3x3/2 max-pool, or with
    ``input_3x3`` 3x3/2 conv (64) -> norm_act -> 3x3 conv (64) -> norm_act -> 3x3 conv (64)
    -> 3x3/2 max-pool (pre-activation: the first block's bn1 follows). Stages ``mod2`` .. ``mod5``: bottleneck identity blocks, channels
    ``base_channels * 2**i``, stride 2 on the first block of mod3..mod5 (replaced by
    dilation 2 in mod5 at output stride 16, by dilation 2 / 4 in mod4 / mod5 at 8).

    Shapes: ``forward_features``: (N, 3, H, W) -> (N, 2048, H/os, W/os) (after ``bn_out``);
    ``forward``: -> (N, num_classes).

    Feature stages (:meth:`feature_stages`): the outputs of ``mod3`` / ``mod4`` / ``mod5.block1.bn1``
    and of ``bn_out`` (pre-activation: a stage's own output is an unnormalized residual sum); the
    stem (:attr:`stem_modules`) is ``mod1``.

    Args:
        structure: blocks per stage (four values).
        norm_act: normalization + activation factory.
        num_classes: logits of the linear classifier.
        output_stride: 32, 16 or 8.
        input_3x3: use the three-3x3-convolution stem.
        groups: cardinality of the grouped 3x3 convolutions.
        base_channels: block channels of the first stage.
    """

    stem_modules = ("mod1",)
    """Top-level children with parameters before ``mod2`` (torchvision's first trainable layer)."""

    def __init__(self, structure: Sequence[int], norm_act: "NormAct", num_classes: int = 1000,
                 output_stride: int = 32, input_3x3: bool = False, groups: int = 64,
                 base_channels: Sequence[int] = (128, 128, 256)) -> None:
        super().__init__()
        check_output_stride(output_stride)
        if len(structure) != 4:
            raise ValueError(f"structure must contain four values, got {list(structure)}")
        self.output_stride = output_stride
        conv = norm_act.conv
        if input_3x3:
            conv1 = conv(3, 64, 3, stride=2, padding=1, bias=False)
            conv2 = conv(64, 64, 3, stride=1, padding=1, bias=False)
            stem = [
                ("conv1", conv1),
                ("bn1", norm_act(64, conv=conv1)),
                ("conv2", conv2),
                ("bn2", norm_act(64, conv=conv2)),
                ("conv3", conv(64, 64, 3, stride=1, padding=1, bias=False)),
            ]
        else:  # no norm here: the first block's bn1 normalizes the pooled stem output
            stem = [("conv1", conv(3, 64, 7, stride=2, padding=3, bias=False))]
        stem.append(("pool", nn.MaxPool2d(3, stride=2, padding=1)))
        self.mod1 = nn.Sequential(OrderedDict(stem))

        in_channels = 64
        channels = tuple(base_channels)
        self._stage_channels: list[int] = []  # output channels of mod2..mod5
        for mod_id, (num, (stride, dilation)) in enumerate(zip(structure,
                                                               _STAGES[output_stride])):
            blocks = []
            for block_id in range(num):
                blocks.append((f"block{block_id + 1}", IdentityResidualBlock(
                    in_channels, channels, stride=stride if block_id == 0 else 1,
                    dilation=dilation, groups=groups, norm_act=norm_act)))
                in_channels = channels[-1]
            self.add_module(f"mod{mod_id + 2}", nn.Sequential(OrderedDict(blocks)))
            self._stage_channels.append(in_channels)
            channels = tuple(2 * c for c in channels)

        self.out_channels = in_channels
        self.bn_out = norm_act(in_channels)
        self.classifier = ClassificationHead(in_channels, num_classes)
        init_conv_weights(self)

    def feature_stages(self) -> tuple[FeatureStage, ...]:
        """C2..C5 of ``mod2`` .. ``mod5``: the normalized + activated stage outputs, i.e. the outputs
        of ``mod3.block1.bn1``, ``mod4.block1.bn1``, ``mod5.block1.bn1`` and ``bn_out``; channels
        256, 512, 1024, 2048 with the default widths, strides 4, 8, 16, 32 pixels at output stride
        32 (see :class:`~abnexp.models.stages.FeatureStage`)."""
        taps = ("mod3.block1.bn1", "mod4.block1.bn1", "mod5.block1.bn1", "bn_out")
        modules = (("mod2",), ("mod3",), ("mod4",), ("mod5", "bn_out"))
        return tuple(FeatureStage(*stage) for stage in zip(taps, self._stage_channels,
                                                            stage_strides(self.output_stride), modules))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, out_channels, H/os, W/os), including ``bn_out``."""
        x = self.mod1(x)
        x = self.mod5(self.mod4(self.mod3(self.mod2(x))))
        return self.bn_out(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> logits (N, num_classes)."""
        return self.classifier(self.forward_features(x))


def resnext50(norm_act: "NormAct", num_classes: int = 1000, output_stride: int = 32,
              input_3x3: bool = False) -> ResNeXt:
    """ResNeXt-50 (64 groups, pre-activation): stages [3, 4, 6, 3]."""
    return ResNeXt([3, 4, 6, 3], norm_act, num_classes, output_stride, input_3x3)


def resnext101(norm_act: "NormAct", num_classes: int = 1000, output_stride: int = 32,
               input_3x3: bool = False) -> ResNeXt:
    """ResNeXt-101 (64 groups, pre-activation): stages [3, 4, 23, 3]."""
    return ResNeXt([3, 4, 23, 3], norm_act, num_classes, output_stride, input_3x3)


def resnext152(norm_act: "NormAct", num_classes: int = 1000, output_stride: int = 32,
               input_3x3: bool = False) -> ResNeXt:
    """ResNeXt-152 (64 groups, pre-activation): stages [3, 8, 36, 3]."""
    return ResNeXt([3, 8, 36, 3], norm_act, num_classes, output_stride, input_3x3)
