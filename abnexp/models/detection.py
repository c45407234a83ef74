"""FPN Mask R-CNN / Faster R-CNN on abnexp backbones, with the configured norm in the FPN and heads.

torchvision's detection models (``torchvision.models.detection.MaskRCNN`` / ``FasterRCNN``:
transform, anchors, RPN, RoI heads, losses, post-processing) are used as they are; this module
supplies the parts the small-batch-normalization papers change (CBN paper, Table 5 and its
released mmdetection configs; MABN paper §5.2):

- :class:`BackboneWithFPN`: a ResNet / pre-activation ResNeXt body tapped at strides 4, 8, 16, 32
  (C2..C5, where the body's ``feature_stages()`` declares them) followed by an :class:`FPN`
  whose lateral 1x1 and output 3x3 convolutions are each followed by a norm (identity activation,
  as mmdetection's FPN with ``norm_cfg``) and a P6 max pool (torchvision's ``LastLevelMaxPool``);
  it can freeze stages and norm layers of the body.
- :class:`ConvFCBoxHead`: the "4conv1fc" box head (4 x [3x3 conv 256 + norm + act], fc 1024 + ReLU).
- :class:`MaskHead`: the 4-conv mask head (4 x [3x3 conv 256 + norm + act]).

Every convolution that feeds a norm is built with ``norm_act.conv`` (MABN's weight-centralized
convolution) without bias, and each norm receives the convolution it follows
(``norm_act(C, conv=conv)``, Cross-Iteration BN's compensation).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from abnexp.config import HeadConfig
from abnexp.models.blocks import init_conv_weights
from abnexp.models.heads import ClassificationHead
from abnexp.models.stages import NOMINAL_STRIDES

if TYPE_CHECKING:
    from abnexp.norm.factory import NormAct

@dataclass
class MaskRCNNHeadConfig(HeadConfig):
    """Mask R-CNN's extra key: convolutions of the mask head (He et al., ICCV 2017, Fig. 4: 4)."""

    mask_head_convs: int = 4


@dataclass(frozen=True)
class HeadSpec:
    """One ``head=`` option: the torchvision detector class, its schema, whether it predicts masks."""

    detector: type
    options: type = HeadConfig
    masks: bool = False


HEADS: dict[str, HeadSpec] = {
    "mask_rcnn_fpn": HeadSpec(MaskRCNN, MaskRCNNHeadConfig, masks=True),
    "faster_rcnn_fpn": HeadSpec(FasterRCNN),
}
"""head name -> its entry (the ``head=`` options of configs/head/, task=detection)."""


class ConvNorm(nn.Module):
    """``norm_act.conv`` (k x k, stride 1, "same" padding, no bias) -> ``norm_act(C, conv=conv)``.

    (R, C_in, H, W) -> (R, C_out, H, W). An empty input (R = 0: no RoIs, e.g. no detection in an
    image at evaluation) skips the norm, so statistics-keeping norms (MABN, CBN) never see an
    empty batch.
    """

    def __init__(self, norm_act: "NormAct", in_channels: int, out_channels: int, kernel_size: int,
                 activation: str | None = None) -> None:
        super().__init__()
        self.conv = norm_act.conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = norm_act(out_channels, activation=activation, conv=self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.bn(x) if x.numel() else x


class FPN(nn.Module):
    """Feature Pyramid Network (Lin et al., CVPR 2017) with a norm after every convolution.

    Input: OrderedDict of C2..C5 (N, in_channels_list[i], H/2^(i+2), W/2^(i+2)); output:
    OrderedDict "0".."3" (P2..P5) and "pool" (P6 = P5 subsampled by 2), each (N, out_channels, ., .).
    Top-down pathway as torchvision's ``FeaturePyramidNetwork`` (nearest upsampling to the
    lateral's size, then sum); norms have no activation.
    """

    def __init__(self, in_channels_list: Sequence[int], out_channels: int, norm_act: "NormAct") -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(ConvNorm(norm_act, c, out_channels, 1, "identity") for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(ConvNorm(norm_act, out_channels, out_channels, 3, "identity")
                                          for _ in in_channels_list)
        self.extra_blocks = LastLevelMaxPool()

    def forward(self, x: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
        names, feats = list(x.keys()), list(x.values())
        last_inner = self.inner_blocks[-1](feats[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[idx](feats[idx])
            last_inner = lateral + F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer_blocks[idx](last_inner))
        results, names = self.extra_blocks(results, feats, names)
        return OrderedDict(zip(names, results))


def _check_stem(body: nn.Module) -> None:
    """ValueError unless the body splits into a stem and four stages (declares ``stem_modules``)."""
    if body.stem_modules is None:
        raise ValueError(f"{type(body).__name__} has no FPN taps for detection (no stem + four stages split); "
                         f"detection supports the resnet* and resnext* models")


def feature_taps(body: nn.Module) -> list[tuple[str, int]]:
    """(module name, channels) whose outputs are the C2..C5 features (strides 4, 8, 16, 32), from
    the body's ``feature_stages()`` declaration (:class:`~abnexp.models.stages.FeatureStage`).

    ResNet v1: the outputs of layer1..layer4. Pre-activation ResNeXt: the outputs of
    ``mod3/mod4/mod5.block1.bn1`` and ``bn_out`` (a stage's own output is an unnormalized residual
    sum; the tapped tensor is the one the next stage consumes, so in-place norms stay safe).

    Raises:
        ValueError: output_stride != 32, or a backbone with no stem + four stages split
            (``stem_modules`` None: WideResNet-38).
    """
    stages = body.feature_stages()
    if tuple(s.stride for s in stages) != NOMINAL_STRIDES:
        raise ValueError(f"detection needs model.output_stride=32 (the FPN adds its own strides), "
                         f"got {getattr(body, 'output_stride', None)}")
    _check_stem(body)
    return [(s.tap, s.channels) for s in stages]


def backbone_stages(body: nn.Module) -> list[list[str]]:
    """Module names of the stem and the four stages, bottom-up (torchvision's trainable-layer
    order), from the body's ``stem_modules`` and ``feature_stages()``.

    Raises:
        ValueError: the body declares no stem (``stem_modules`` None: WideResNet-38).
    """
    _check_stem(body)
    return [list(body.stem_modules)] + [list(s.modules) for s in body.feature_stages()]


def remove_classifier(body: nn.Module) -> list[str]:
    """Deletes the classification head (``fc`` / ``classifier``); returns the deleted names."""
    names = [n for n, m in body.named_children() if isinstance(m, ClassificationHead)]
    for n in names:
        delattr(body, n)
    return names


class BackboneWithFPN(nn.Module):
    """Backbone body + :class:`FPN`: (N, 3, H, W) -> OrderedDict "0".."3", "pool" of
    (N, out_channels, H/2^k, W/2^k), k = 2..6 (``out_channels`` as torchvision's detectors expect).

    The body runs its own ``forward_features``; forward hooks on the tapped modules
    (:func:`feature_taps`) collect C2..C5. ``frozen`` modules get ``requires_grad=False`` and
    stay in eval mode whatever ``train()`` is called with (frozen stages; frozen BatchNorm, i.e.
    torchvision's ``FrozenBatchNorm2d`` semantics for norm layers: fixed statistics and affine).
    """

    def __init__(self, body: nn.Module, norm_act: "NormAct", out_channels: int = 256,
                 frozen: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        remove_classifier(body)
        taps = feature_taps(body)
        self.body = body
        self.fpn = FPN([c for _, c in taps], out_channels, norm_act)
        init_conv_weights(self.fpn)
        self.out_channels = out_channels
        self._taps = [name for name, _ in taps]
        self._features: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self._taps):
            body.get_submodule(name).register_forward_hook(partial(self._keep, str(i)))
        self.frozen = list(frozen)
        for m in self.frozen:
            m.requires_grad_(False)
        self.train(self.training)

    def _keep(self, key: str, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._features[key] = output

    def train(self, mode: bool = True) -> "BackboneWithFPN":
        super().train(mode)
        for m in self.frozen:
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        self._features = {}
        self.body.forward_features(x)
        features, self._features = self._features, {}
        return self.fpn(OrderedDict((str(i), features[str(i)]) for i in range(len(self._taps))))


class ConvFCBoxHead(nn.Sequential):
    """The "4conv1fc" box head: num_convs x ConvNorm 3x3 -> flatten -> fc -> ReLU.

    (R, in_channels, resolution, resolution) -> (R, fc_dim). Source: Wu & He, "Group
    Normalization" (ECCV 2018) §6.1 / detectron's ``roi_xconv1fc_gn_head``; CBN paper §4.2.
    """

    def __init__(self, norm_act: "NormAct", in_channels: int = 256, resolution: int = 7, num_convs: int = 4,
                 conv_channels: int = 256, fc_dim: int = 1024) -> None:
        layers = [ConvNorm(norm_act, in_channels if i == 0 else conv_channels, conv_channels, 3)
                  for i in range(num_convs)]
        flat = (conv_channels if num_convs else in_channels) * resolution * resolution
        super().__init__(*layers, nn.Flatten(), nn.Linear(flat, fc_dim), nn.ReLU(inplace=True))
        self.out_channels = fc_dim
        init_conv_weights(self)


class MaskHead(nn.Sequential):
    """The 4-conv mask head: num_convs x ConvNorm 3x3, (R, in_channels, 14, 14) -> (R, channels, 14, 14)
    (Mask R-CNN, He et al. ICCV 2017, Fig. 4; followed by torchvision's ``MaskRCNNPredictor``)."""

    def __init__(self, norm_act: "NormAct", in_channels: int = 256, num_convs: int = 4, channels: int = 256) -> None:
        super().__init__(*[ConvNorm(norm_act, in_channels if i == 0 else channels, channels, 3)
                           for i in range(num_convs)])
        init_conv_weights(self)


def build_detector(head: str, backbone: BackboneWithFPN, norm_act: "NormAct", num_classes: int,
                   box_head_convs: int = 4, box_head_fc: int = 1024, mask_head_convs: int = 4,
                   **rcnn_kwargs) -> nn.Module:
    """torchvision's Mask R-CNN (``head="mask_rcnn_fpn"``) or Faster R-CNN (``"faster_rcnn_fpn"``)
    with ``backbone``, the 4conv1fc box head and (Mask R-CNN) the 4-conv mask head, both normed by
    ``norm_act``.

    Args:
        num_classes: object categories, background excluded (the predictors get num_classes + 1).
        rcnn_kwargs: further torchvision detector arguments (min_size, max_size, image_mean,
            image_std, rpn_*_nms_top_n_*, box_batch_size_per_image, box_detections_per_img, ...).

    Raises:
        ValueError: unknown ``head`` (lists the valid ones).
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; valid heads: {', '.join(HEADS)}")
    spec = HEADS[head]
    channels = backbone.out_channels
    box_head = ConvFCBoxHead(norm_act, channels, 7, box_head_convs, channels, box_head_fc)
    kwargs = dict(box_head=box_head, box_predictor=FastRCNNPredictor(box_head_fc, num_classes + 1), **rcnn_kwargs)
    if spec.masks:
        kwargs.update(mask_head=MaskHead(norm_act, channels, mask_head_convs, channels),
                      mask_predictor=MaskRCNNPredictor(channels, channels, num_classes + 1))
    return spec.detector(backbone, num_classes=None, **kwargs)
