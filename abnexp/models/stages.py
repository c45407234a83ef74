"""Feature stages a backbone declares: where its stride-4, 8, 16 and 32 feature maps are tapped.

A backbone's ``feature_stages()`` returns one :class:`FeatureStage` per stage, bottom-up: the
C2..C5 maps of Lin et al., "Feature Pyramid Networks for Object Detection" (CVPR 2017, §3:
"the output of the last residual block" of each stage, strides 4, 8, 16, 32 pixels), which the
detector's FPN consumes. A pre-activation network's residual blocks output raw sums that only the
next block's first norm normalizes, so its taps are that norm (the next stage's ``block1.bn1``,
and the final ``bn_out`` for the last stage), whose output is also the tensor the network itself
uses next (a tap never sees a tensor an in-place norm overwrites later).
"""
from __future__ import annotations

from dataclasses import dataclass

NOMINAL_STRIDES = (4, 8, 16, 32)
"""Strides [pixels] of the four stages of a backbone built with output stride 32."""


@dataclass(frozen=True)
class FeatureStage:
    """One stage of a backbone's feature pyramid.

    Attributes:
        tap: name of the module (as in ``named_modules()``) whose forward output is the stage's
            feature map: (N, channels, ceil(H / stride), ceil(W / stride)), the input's dtype, for
            an (N, 3, H, W) input to ``forward_features``.
        channels: channels of that feature map.
        stride: input pixels per feature-map pixel: 4, 8, 16, 32 at output stride 32; a stage
            dilated instead of strided keeps the previous stride, so at output stride 16 / 8 the
            last one / three stages report 16 / 8.
        modules: the backbone's top-level children that compute the stage (those with parameters,
            bottom-up), i.e. what freezing the stage freezes.
    """

    tap: str
    channels: int
    stride: int
    modules: tuple[str, ...]


def stage_strides(output_stride: int) -> tuple[int, ...]:
    """Actual strides [pixels] of the four stages at ``output_stride`` (8, 16 or 32): the nominal
    4, 8, 16, 32 capped at the output stride, e.g. (4, 8, 16, 16) at 16."""
    return tuple(min(s, output_stride) for s in NOMINAL_STRIDES)
