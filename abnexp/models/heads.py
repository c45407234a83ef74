"""Classification head shared by every backbone.

The head is global average pooling followed by a fully-connected layer, as in torchvision's
ResNet (``avgpool`` + ``fc``) and the reference InPlace-ABN library's ``classifier``
(``GlobalAvgPool2d`` + ``Linear``).
"""
from __future__ import annotations

import torch
from torch import nn


class ClassificationHead(nn.Linear):
    """Global average pooling + linear layer: (N, C, H, W) -> (N, num_classes).

    It subclasses :class:`torch.nn.Linear` so that its parameters are named ``weight`` and
    ``bias`` directly; a ResNet stores it as ``fc`` and thereby keeps torchvision's
    ``fc.weight`` / ``fc.bias`` state-dict names.

    Args:
        in_channels: channels C of the feature map.
        num_classes: number of output logits.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) from features (N, C, H, W)."""
        return super().forward(torch.flatten(x.mean(dim=(2, 3)), 1))
