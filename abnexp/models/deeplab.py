"""DeepLabV3 head and the segmentation model (backbone + head + 1×1 classifier + upsampling).

Sources: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation"
(arXiv 1706.05587, DeepLabV3); Rota Bulò et al., "In-Place Activated BatchNorm" (CVPR 2018),
whose head (reference library, ``modules/deeplab.py``) is: a 1×1 and three 3×3 dilated
convolutions (rates 12, 24, 36 at output stride 8, halved at 16), 256 channels each,
concatenated → norm-act → 1×1 reduction; a global-average-pooling branch (1×1 conv → norm-act →
1×1 conv) added back at every position; a final norm-act. Every normalization comes from the
injected :class:`~abnexp.norm.factory.NormAct`, so ``norm=inplace_abn`` applies to the head too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from abnexp.models.blocks import init_conv_weights
from abnexp.models.heads import ClassificationHead

if TYPE_CHECKING:
    from abnexp.norm.factory import NormAct

RATES = {8: (12, 24, 36), 16: (6, 12, 18)}  # output stride -> dilation rates of the 3x3 branches


class DeepLabV3Head(nn.Module):
    """(N, in_channels, h, w) -> (N, channels, h, w), see the module docstring.

    Module names as the reference library: ``map_convs`` (4 branches), ``map_bn``, ``red_conv``,
    ``global_pooling_conv``, ``global_pooling_bn``, ``pool_red_conv``, ``red_bn``.

    In training mode the pooled branch normalizes one value per image and channel, so it
    needs at least two images per process (ValueError otherwise, as torch BatchNorm).

    Args:
        in_channels: backbone output channels.
        channels: channels of each branch and of the output (256 in the paper).
        norm_act: normalization + activation factory.
        rates: dilations of the three 3×3 branches (:data:`RATES`).
    """

    def __init__(self, in_channels: int, channels: int, norm_act: "NormAct", rates=(12, 24, 36)) -> None:
        super().__init__()
        conv = norm_act.conv
        self.map_convs = nn.ModuleList(
            [conv(in_channels, channels, 1, bias=False)]
            + [conv(in_channels, channels, 3, padding=r, dilation=r, bias=False) for r in rates])
        self.map_bn = norm_act(channels * 4)  # normalizes a concatenation: no single conv to pair with
        self.red_conv = conv(channels * 4, channels, 1, bias=False)
        self.global_pooling_conv = conv(in_channels, channels, 1, bias=False)
        self.global_pooling_bn = norm_act(channels, conv=self.global_pooling_conv)
        self.pool_red_conv = conv(channels, channels, 1, bias=False)
        self.red_bn = norm_act(channels)  # normalizes red_conv + pool_red_conv
        init_conv_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.map_bn(torch.cat([m(x) for m in self.map_convs], dim=1))
        pool = self.global_pooling_bn(self.global_pooling_conv(x.mean(dim=(2, 3), keepdim=True)))
        out = self.red_conv(out) + self.pool_red_conv(pool)  # pooled branch broadcast over h, w
        return self.red_bn(out)


class DeepLabV3(nn.Module):
    """Backbone + DeepLabV3 head + 1×1 classifier, logits upsampled bilinearly to the input size.

    The backbone's classification head is replaced by ``nn.Identity`` (no parameters that
    never receive a gradient, so DistributedDataParallel needs no ``find_unused_parameters``).

    Shapes: (N, 3, H, W) float -> logits (N, num_classes, H, W).

    Args:
        backbone: a model of :data:`abnexp.models.MODELS` built with output stride 8 or 16.
        num_classes: classes of the classifier.
        norm_act: normalization + activation factory of the head.
        channels: head channels (256).

    Raises:
        ValueError: the backbone's output stride is not 8 or 16.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, norm_act: "NormAct", channels: int = 256) -> None:
        super().__init__()
        if backbone.output_stride not in RATES:
            raise ValueError(f"DeepLabV3 needs a backbone at output stride 8 or 16 (model.output_stride), "
                             f"got {backbone.output_stride}")
        for name, child in list(backbone.named_children()):
            if isinstance(child, ClassificationHead):
                setattr(backbone, name, nn.Identity())
        self.backbone = backbone
        self.head = DeepLabV3Head(backbone.out_channels, channels, norm_act, RATES[backbone.output_stride])
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.head(self.backbone.forward_features(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
