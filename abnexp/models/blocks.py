"""Pre-activation residual block and small helpers shared by the backbones.

:class:`IdentityResidualBlock` is the identity-mapping ("pre-activation") block of He et al.,
"Identity Mappings in Deep Residual Networks" (ECCV 2016), in the configuration of the
reference InPlace-ABN library (mapillary/inplace_abn, ``modules/residual.py``) used by its
ResNeXt and WideResNet-38 models. Every normalization comes from the injected
:class:`~abnexp.norm.factory.NormAct`; every convolution is built with ``norm_act.conv``
(in a pre-activation network every convolution's output reaches a normalization layer,
either directly or through the residual sum).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # imported for annotations only; keeps this module importable on its own
    from abnexp.norm.factory import NormAct

VALID_OUTPUT_STRIDES = (8, 16, 32)


def check_output_stride(output_stride: int) -> None:
    """Raise ``ValueError`` unless ``output_stride`` is one of 8, 16, 32."""
    if output_stride not in VALID_OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {list(VALID_OUTPUT_STRIDES)}, "
                         f"got {output_stride!r}")


def reject_input_3x3(model_name: str, input_3x3: bool) -> None:
    """Raise ``ValueError`` when ``input_3x3`` is requested for a model without that stem."""
    if input_3x3:
        raise ValueError(f"input_3x3=True is only supported by the ResNeXt models, "
                         f"not by {model_name}")


def init_conv_weights(model: nn.Module) -> None:
    """He (Kaiming) normal init, fan_out mode, for every conv (torchvision's ResNet init).

    Normalization layers keep their own initialization (gamma=1, beta=0); linear layers keep
    PyTorch's default.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def is_inplace(module: nn.Module) -> bool:
    """Whether a normalization layer overwrites its input (class attribute ``inplace``)."""
    return bool(getattr(module, "inplace", False))


class ResidualBlock(nn.Module):
    """A residual block; :meth:`last_norm` is the last normalization of its residual branch, whose
    γ :func:`zero_init_residual` sets to 0 so that the block starts as its shortcut."""

    def last_norm(self) -> nn.Module:
        raise NotImplementedError


def zero_init_residual(model: nn.Module) -> None:
    """Sets γ of every residual branch's last norm to 0 (torchvision's ``zero_init_residual``;
    Goyal et al., "Accurate, Large Minibatch SGD", 2017, §5.1): each block starts as its
    shortcut. With β = 0 and an activation with φ(0) = 0 this also zeroes a pre-activation
    branch, whose last norm feeds one more convolution.

    Raises:
        ValueError: a norm without a learnable γ (frozen BN) or one that scales by |γ| + ε
            (the in-place strategies, InPlace-ABN §3.2: γ = 0 does not zero the branch).
    """
    norms = [m.last_norm() for m in model.modules() if isinstance(m, ResidualBlock)]
    for norm in norms:
        if is_inplace(norm):
            raise ValueError(f"model.zero_init_residual=true with {type(norm).__name__}: the in-place strategies "
                             f"scale by |γ| + ε, so γ = 0 does not zero a residual branch; use norm=bn (or "
                             f"another norm with a plain γ) or model.zero_init_residual=false")
        if not isinstance(getattr(norm, "weight", None), nn.Parameter):
            raise ValueError(f"model.zero_init_residual=true with {type(norm).__name__}: it has no learnable γ "
                             f"(e.g. frozen BN); use model.zero_init_residual=false")
    with torch.no_grad():
        for norm in norms:
            norm.weight.zero_()


class IdentityResidualBlock(ResidualBlock):
    """Pre-activation residual block: ``out = branch(bn1(x)) + shortcut``.

    Layout (names as in the reference library):

    - ``bn1 = norm_act(in_channels)`` is applied to the input first;
    - bottleneck branch (``len(channels) == 3``): ``convs.conv1`` 1x1 (stride) ->
      ``convs.bn2`` -> ``convs.conv2`` 3x3 grouped (dilation) -> ``convs.bn3`` ->
      [``convs.dropout``] -> ``convs.conv3`` 1x1;
    - basic branch (``len(channels) == 2``): ``convs.conv1`` 3x3 (stride, dilation) ->
      ``convs.bn2`` -> [``convs.dropout``] -> ``convs.conv2`` 3x3 (dilation);
    - shortcut: ``proj_conv(bn1(x))`` (1x1, stride) when ``stride != 1`` or
      ``in_channels != channels[-1]``, the identity ``x`` otherwise.

    When ``bn1`` is in place (InPlace-ABN) it overwrites ``x``, so an identity shortcut is
    cloned before ``bn1`` runs (only then). No activation follows the addition and nothing
    here acts in place, so blocks can be chained after in-place norms.

    Shapes: (N, in_channels, H, W) -> (N, channels[-1], ceil(H / stride), ceil(W / stride)).

    Args:
        in_channels: input channels.
        channels: 2 (basic) or 3 (bottleneck) internal/output channel counts.
        stride: stride of the first convolution of the branch and of ``proj_conv``.
        dilation: dilation of the 3x3 convolutions.
        groups: groups (cardinality) of the 3x3 convolution; bottleneck only.
        norm_act: factory of normalization + activation layers.
        dropout: zero-argument callable making a dropout module inserted before the last
            convolution of the branch, or ``None``.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], stride: int = 1,
                 dilation: int = 1, groups: int = 1, norm_act: "NormAct" = None,
                 dropout: Callable[[], nn.Module] | None = None) -> None:
        super().__init__()
        if norm_act is None:
            raise ValueError("IdentityResidualBlock needs a norm_act factory")
        channels = tuple(channels)
        if len(channels) not in (2, 3):
            raise ValueError(f"channels must contain two or three values, got {channels}")
        if len(channels) == 2 and groups != 1:
            raise ValueError("groups > 1 is only valid for bottleneck blocks (three channels)")
        conv = norm_act.conv
        self.bn1 = norm_act(in_channels)
        if len(channels) == 2:
            conv1 = conv(in_channels, channels[0], 3, stride=stride, padding=dilation,
                         dilation=dilation, bias=False)
            layers = [
                ("conv1", conv1),
                ("bn2", norm_act(channels[0], conv=conv1)),
                ("conv2", conv(channels[0], channels[1], 3, stride=1, padding=dilation,
                               dilation=dilation, bias=False)),
            ]
        else:
            conv1 = conv(in_channels, channels[0], 1, stride=stride, bias=False)
            conv2 = conv(channels[0], channels[1], 3, stride=1, padding=dilation,
                         dilation=dilation, groups=groups, bias=False)
            layers = [
                ("conv1", conv1),
                ("bn2", norm_act(channels[0], conv=conv1)),
                ("conv2", conv2),
                ("bn3", norm_act(channels[1], conv=conv2)),
                ("conv3", conv(channels[1], channels[2], 1, stride=1, bias=False)),
            ]
        if dropout is not None:
            layers.insert(len(layers) - 1, ("dropout", dropout()))
        self.convs = nn.Sequential(OrderedDict(layers))
        self.proj_conv = None
        if stride != 1 or in_channels != channels[-1]:
            self.proj_conv = conv(in_channels, channels[-1], 1, stride=stride, bias=False)

    def last_norm(self) -> nn.Module:
        return self.convs.bn3 if hasattr(self.convs, "bn3") else self.convs.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H', W'); see the class docstring."""
        if self.proj_conv is not None:
            pre = self.bn1(x)
            shortcut = self.proj_conv(pre)
        else:
            shortcut = x.clone() if is_inplace(self.bn1) else x
            pre = self.bn1(x)
        return self.convs(pre) + shortcut
