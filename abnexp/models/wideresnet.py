"""WideResNet-38 ("A2" variant) as used in the InPlace-ABN paper.

Sources: Wu, Shen, van den Hengel, "Wider or Deeper: Revisiting the ResNet Model for Visual
Recognition" (Pattern Recognition 2019, model A / "ResNet-38"); Rota Bulò et al.,
"In-Place Activated BatchNorm" (CVPR 2018) and its reference library
(mapillary/inplace_abn, ``models/wider_resnet.py``, class ``WiderResNetA2``):
pre-activation identity blocks, max-pool down-sampling before mod2 and mod3, strided
convolutions in the first block of mod4..mod6, dropout 0.3 / 0.5 in mod6 / mod7.

Module names: ``mod1`` (stem conv), ``pool2``, ``mod2``, ``pool3``, ``mod3`` .. ``mod7``
(blocks ``block1`` ..), ``bn_out``, ``classifier``.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from abnexp.models.blocks import (IdentityResidualBlock, check_output_stride,
                                  init_conv_weights, reject_input_3x3)
from abnexp.models.heads import ClassificationHead
from abnexp.models.stages import FeatureStage, stage_strides

if TYPE_CHECKING:
    from abnexp.norm.factory import NormAct

STRUCTURE = (3, 3, 6, 3, 1, 1)
CHANNELS = ((128, 128), (256, 256), (512, 512), (512, 1024), (512, 1024, 2048),
            (1024, 2048, 4096))
DROPOUT = (None, None, None, None, 0.3, 0.5)
# output stride -> (stride of the first block, dilation of all blocks) for mod2..mod7
_STAGES = {
    32: ((1, 1), (1, 1), (2, 1), (2, 1), (2, 1), (1, 1)),
    16: ((1, 1), (1, 1), (2, 1), (2, 1), (1, 2), (1, 2)),
    8: ((1, 1), (1, 1), (2, 1), (1, 2), (1, 4), (1, 4)),
}


class WideResNet38(nn.Module):
    """WideResNet-38 A2 backbone + classifier.

    Down-sampling: stem 3x3 conv stride 1, max-pool 3/2 before mod2 (os 2) and mod3 (os 4),
    stride 2 in mod4 (os 8), mod5 (os 16), mod6 (os 32). Output stride 16: mod6/mod7 use
    dilation 2 instead; output stride 8: mod5 dilation 2, mod6/mod7 dilation 4 (the
    paper's segmentation setting).

    Shapes: ``forward_features``: (N, 3, H, W) -> (N, 4096, H/os, W/os) (after ``bn_out``);
    ``forward``: -> (N, num_classes).

    Feature stages (:meth:`feature_stages`): strides 4 (``mod3``), 8 (``mod4``), 16 (``mod5``) and
    32 (``mod6`` + ``mod7``), tapped where they are normalized (``mod4`` / ``mod5`` /
    ``mod6.block1.bn1``, ``bn_out``). No stem is declared (:attr:`stem_modules` is None): the
    network runs a residual stage (``mod2``) at stride 2, below the stride-4 stage, so it has no
    stem + four stages split (torchvision's ``trainable_backbone_layers``) and is no detection
    backbone.

    Args:
        norm_act: normalization + activation factory.
        num_classes: logits of the linear classifier.
        output_stride: 32, 16 or 8.
        input_3x3: not supported (ValueError if True).
    """

    stem_modules = None

    def __init__(self, norm_act: "NormAct", num_classes: int = 1000, output_stride: int = 32,
                 input_3x3: bool = False) -> None:
        super().__init__()
        reject_input_3x3("wideresnet38", input_3x3)
        check_output_stride(output_stride)
        self.output_stride = output_stride
        self.mod1 = nn.Sequential(OrderedDict(
            [("conv1", norm_act.conv(3, 64, 3, stride=1, padding=1, bias=False))]))
        in_channels = 64
        stages = _STAGES[output_stride]
        for mod_id, (num, channels, p, (stride, dilation)) in enumerate(
                zip(STRUCTURE, CHANNELS, DROPOUT, stages)):
            dropout = None if p is None else partial(nn.Dropout2d, p=p)
            blocks = []
            for block_id in range(num):
                blocks.append((f"block{block_id + 1}", IdentityResidualBlock(
                    in_channels, channels, stride=stride if block_id == 0 else 1,
                    dilation=dilation, norm_act=norm_act, dropout=dropout)))
                in_channels = channels[-1]
            if mod_id < 2:
                self.add_module(f"pool{mod_id + 2}", nn.MaxPool2d(3, stride=2, padding=1))
            self.add_module(f"mod{mod_id + 2}", nn.Sequential(OrderedDict(blocks)))

        self.out_channels = in_channels
        self.bn_out = norm_act(in_channels)
        self.classifier = ClassificationHead(in_channels, num_classes)
        init_conv_weights(self)

    def feature_stages(self) -> tuple[FeatureStage, ...]:
        """The stride-4, 8, 16, 32 maps: the outputs of ``mod4.block1.bn1`` (normalized ``mod3``
        output, 256 channels), ``mod5.block1.bn1`` (``mod4``, 512), ``mod6.block1.bn1`` (``mod5``,
        1024) and ``bn_out`` (``mod7``, 4096); strides at output stride 32 (see
        :class:`~abnexp.models.stages.FeatureStage`)."""
        taps = ("mod4.block1.bn1", "mod5.block1.bn1", "mod6.block1.bn1", "bn_out")
        channels = (CHANNELS[1][-1], CHANNELS[2][-1], CHANNELS[3][-1], self.out_channels)
        modules = (("mod3",), ("mod4",), ("mod5",), ("mod6", "mod7", "bn_out"))
        return tuple(FeatureStage(*stage) for stage in zip(taps, channels, stage_strides(self.output_stride),
                                                            modules))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, out_channels, H/os, W/os), including ``bn_out``."""
        x = self.mod1(x)
        x = self.mod2(self.pool2(x))
        x = self.mod3(self.pool3(x))
        x = self.mod7(self.mod6(self.mod5(self.mod4(x))))
        return self.bn_out(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> logits (N, num_classes)."""
        return self.classifier(self.forward_features(x))


def wideresnet38(norm_act: "NormAct", num_classes: int = 1000, output_stride: int = 32,
                 input_3x3: bool = False) -> WideResNet38:
    """WideResNet-38 A2: structure [3, 3, 6, 3, 1, 1], out_channels 4096."""
    return WideResNet38(norm_act, num_classes, output_stride, input_3x3)
