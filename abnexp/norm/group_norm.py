"""Group Normalization + activation (``norm=gn``), the batch-independent baseline.

Source: Wu & He, "Group Normalization" (ECCV 2018), Eq. 1-3 with G = 32 groups (the paper's
default, also detectron2's and the CBN paper's GN baseline). Statistics are per sample, so the
layer behaves identically in training and evaluation and for any batch (or ``group_size``).
"""
from __future__ import annotations

import math
from typing import Any, Optional

from torch import Tensor, nn

from abnexp.norm.activations import activate, get_activation
from abnexp.norm.base import empty_output


class GroupNormAct(nn.GroupNorm):
    """``torch.nn.GroupNorm(num_groups, num_features)`` followed by the activation.

    Constructor compatible with the other norms (see :class:`~abnexp.norm.NormActBase`):
    ``momentum`` and ``track_running_stats`` are accepted and ignored (GroupNorm keeps no
    running statistics). Parameters ``weight`` / ``bias`` (C,) as ``nn.GroupNorm``, so its
    state dicts load either way.

    Input (N, C, *), output the same shape and dtype. An input without values (N = 0 or a
    zero-size spatial dim, which ``nn.GroupNorm`` refuses for the latter) gives an empty output
    and zero gradients to weight and bias, as the batch-statistics norms do.

    Raises:
        ValueError: ``num_features`` not divisible by ``num_groups``; unknown activation; an
            input of one value per group in all (``nn.GroupNorm``'s check, N * C/G * H * W == 1),
            naming the layer and the input size.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = None,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01,
                 num_groups: int = 32, device: Any = None, dtype: Any = None) -> None:
        get_activation(activation)
        if num_features % num_groups:
            raise ValueError(f"GroupNorm with {num_groups} groups needs a channel count divisible by "
                             f"{num_groups}, got {num_features}")
        super().__init__(num_groups, num_features, eps, affine, device=device, dtype=dtype)
        self.activation = activation
        self.activation_param = float(activation_param)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] * (self.num_channels // self.num_groups) * math.prod(x.shape[2:]) == 1:
            raise ValueError(f"GroupNormAct({self.num_channels}): Expected more than 1 value per channel when "
                             f"training, got input size {x.size()} (one value per group, as nn.GroupNorm refuses)")
        y = empty_output(x, self.weight, self.bias) if x.numel() == 0 else super().forward(x)
        return activate(self.activation, y, self.activation_param)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}, activation_param={self.activation_param}"
