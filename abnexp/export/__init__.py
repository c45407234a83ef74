"""Export for deployment: normalizations folded into their inference form
(:func:`~abnexp.export.fold.inference_model`) and written as ONNX, a ``torch.export`` program or a
state dict (:data:`~abnexp.export.formats.FORMATS`)."""
from __future__ import annotations

from abnexp.export.fold import ChannelAffine, inference_model

__all__ = ["ChannelAffine", "inference_model"]
