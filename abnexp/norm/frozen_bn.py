"""Frozen BatchNorm + activation (``norm=frozen_bn``), as detection backbones use it.

Source: torchvision.ops.FrozenBatchNorm2d (detectron2's FrozenBatchNorm2d): BatchNorm whose
statistics *and* affine transform are fixed buffers, ``y = (x - running_mean) * weight /
sqrt(running_var + eps) + bias`` in training and evaluation alike. Nothing is learned (the
layer has no parameters, so the optimizer never sees it); the values come from a checkpoint
(``model.pretrained``; a BatchNorm state dict loads, ``num_batches_tracked`` is ignored).
Trained from scratch it is the identity followed by the activation.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBN

from abnexp.norm.activations import activate, get_activation
from abnexp.norm.base import batchnorm_affine


class FrozenBatchNorm2d(_TorchvisionFrozenBN):
    """torchvision's ``FrozenBatchNorm2d`` followed by the activation.

    Constructor compatible with the other norms (see :class:`~abnexp.norm.NormActBase`);
    ``momentum``, ``affine`` and ``track_running_stats`` are accepted and ignored. Buffers
    ``weight``, ``bias``, ``running_mean``, ``running_var`` (C,), float32 unless ``dtype``.

    Input (N, C, H, W); output the same shape, in the dtype of ``x`` promoted with the buffers'
    (float32 buffers turn a float16 input into a float32 output, as torchvision's layer does).

    Raises:
        ValueError: unknown activation.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = None,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01,
                 device: Any = None, dtype: Any = None) -> None:
        get_activation(activation)
        super().__init__(num_features, eps)
        self.to(device=device, dtype=dtype)
        self.activation = activation
        self.activation_param = float(activation_param)

    def forward(self, x: Tensor) -> Tensor:
        return activate(self.activation, super().forward(x), self.activation_param)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, activation={self.activation}, activation_param={self.activation_param})"

    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """The fixed map ``scale * x + shift`` before the activation (as
        :meth:`abnexp.norm.NormActBase.inference_affine`): (C,) float64 (scale, shift)."""
        return batchnorm_affine(self.weight, self.bias, self.running_mean, self.running_var, self.eps)
