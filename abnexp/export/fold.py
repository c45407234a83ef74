"""Normalizations in their inference form, folded into the preceding convolution.

In eval mode BN, InPlace-ABN (scale ``|γ| + ε``), MABN, CBN, BRN, frozen BN and the sync layers
are per-channel affine maps ``y = scale * x + shift`` (each layer's own ``inference_affine()``, see
:meth:`abnexp.norm.NormActBase.inference_affine`) followed by their activation. Where a layer
normalizes the output of a convolution that nothing else reads, the map folds into that
convolution (Ioffe & Szegedy 2015, §3.2; Jacob et al., CVPR 2018, §3.2 "batch normalization
folding"): ``W' = scale · W_eff`` (per output filter), ``b' = scale · b + shift``, where ``W_eff``
is the weight the convolution actually applies (MABN's weight-centralized ``CenConv2d``:
``W - mean(W)``, MABN paper §4.3). Elsewhere (a norm after a residual sum, pre-activation
blocks) it becomes a :class:`ChannelAffine`. GroupNorm normalizes per sample and stays;
activations stay. The conv -> norm pairs are read from a ``torch.fx`` trace of the model (the
norms and convolutions as leaves), so nothing depends on attribute names.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Callable

import torch
import torch.fx
from torch import Tensor, nn

from abnexp.norm import CenConv2d, make_activation


def _centred(conv: nn.Conv2d) -> Tensor:
    """``W - mean(W)`` per output filter, as :class:`~abnexp.norm.CenConv2d` applies it."""
    w = conv.weight.detach()
    return w - w.mean(dim=(1, 2, 3), keepdim=True)


CONV_WEIGHTS: dict[type, Callable[[nn.Conv2d], Tensor]] = {
    nn.Conv2d: lambda conv: conv.weight.detach(),
    CenConv2d: _centred,
}
"""convolution class (exact type) -> the weight its forward applies; the convolutions folding handles."""


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel (dim 1): a normalization's eval-mode map where no
    convolution takes it (exported as ONNX Mul + Add).

    Args:
        scale, shift: (C,) tensors (stored as float32 buffers unless ``dtype``).
    Input (N, C, *), output the same shape.
    """

    def __init__(self, scale: Tensor, shift: Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().to(dtype).clone())
        self.register_buffer("shift", shift.detach().to(dtype).clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


def is_affine_norm(module: nn.Module) -> bool:
    """A normalization whose eval form is a per-channel affine map (it has ``inference_affine``)."""
    return callable(getattr(module, "inference_affine", None))


class _Tracer(torch.fx.Tracer):
    """Keeps the affine norms and the foldable convolutions as single graph nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_affine_norm(m) or type(m) in CONV_WEIGHTS or super().is_leaf_module(m, qualname)


def plain_conv(conv: nn.Conv2d, weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
    """An ``nn.Conv2d`` with ``conv``'s geometry and the given weight / bias (cast to conv's dtype)."""
    ref = conv.weight
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias is not None, conv.padding_mode,
                    device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        new.weight.copy_(weight.to(ref.dtype))
        if bias is not None:
            new.bias.copy_(bias.to(ref.dtype))
    return new.requires_grad_(False)


def fold_into_conv(conv: nn.Conv2d, scale: Tensor, shift: Tensor) -> nn.Conv2d:
    """The convolution computing ``scale * conv(x) + shift`` (per output channel), in float64 then
    cast: ``W' = scale · W_eff``, ``b' = scale · b + shift``."""
    weight = CONV_WEIGHTS[type(conv)](conv).double() * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias.detach().double() * scale + shift
    return plain_conv(conv, weight, bias)


def _foldable_conv(norm_node: torch.fx.Node, modules: dict[str, nn.Module], calls: Counter) -> str | None:
    """The name of the convolution the norm of ``norm_node`` can be folded into, else None: the
    norm's only input is the output of a foldable conv that nothing else reads, and both modules
    are called once per forward."""
    src = norm_node.args[0] if len(norm_node.args) == 1 and not norm_node.kwargs else None
    if not isinstance(src, torch.fx.Node) or src.op != "call_module":
        return None
    if type(modules[src.target]) not in CONV_WEIGHTS or len(src.users) != 1:
        return None
    return src.target if calls[src.target] == 1 and calls[norm_node.target] == 1 else None


def _trace_pairs(module: nn.Module, prefix: str, fold: bool, replacements: dict[str, nn.Module]) -> None:
    """Fills ``replacements`` (qualified name -> new module) for the norms of ``module``: from one
    ``torch.fx`` trace of it, else (data-dependent Python, e.g. torchvision's detectors) from each
    child's."""
    if is_affine_norm(module):
        replacements.setdefault(prefix[:-1], _affine_form(module))  # prefix[:-1]: the module's name
        return
    try:
        graph = _Tracer().trace(module)
    except Exception:  # fx raises TraceError, TypeError, KeyError, ... on untraceable Python
        for name, child in module.named_children():
            _trace_pairs(child, f"{prefix}{name}.", fold, replacements)
        return
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    local = dict(module.named_modules())
    for node in graph.nodes:
        name = prefix + node.target if node.op == "call_module" else None
        if name is None or not is_affine_norm(local[node.target]) or name in replacements:
            continue
        norm = local[node.target]
        conv = _foldable_conv(node, local, calls) if fold else None
        if conv is None:
            replacements[name] = _affine_form(norm)
        else:
            scale, shift = norm.inference_affine()
            replacements[prefix + conv] = fold_into_conv(local[conv], scale, shift)
            replacements[name] = make_activation(norm.activation, norm.activation_param)


def _affine_form(norm: nn.Module) -> nn.Module:
    """:class:`ChannelAffine` + the norm's activation."""
    scale, shift = norm.inference_affine()
    return nn.Sequential(ChannelAffine(scale, shift, norm.running_var.dtype),
                         make_activation(norm.activation, norm.activation_param))


def inference_model(model: nn.Module, fold: bool = True) -> nn.Module:
    """A copy of ``model`` in eval mode with every affine normalization in its inference form.

    ``fold=True``: each such norm folds into the convolution before it where that convolution's
    output goes to the norm only (the norm becomes its activation), else becomes
    :class:`ChannelAffine` + activation; ``fold=False``: every norm becomes :class:`ChannelAffine`
    + activation after its unchanged convolution. Foldable convolutions become plain
    ``nn.Conv2d`` (MABN's centred weight written out; CBN's hooks dropped). GroupNorm and every
    other module stay; a replaced norm's forward hooks (a detector's feature taps) move to its
    replacement. Pairs are found in the largest submodules ``torch.fx`` traces (the whole model
    for classification and segmentation; inside torchvision's detectors, the backbone body --
    the FPN and heads skip their norms on empty inputs, which fx cannot trace, so their norms
    stay unfolded affine maps). The copy computes the eval-mode function of ``model`` (up to float
    rounding) with standard ops only (no native kernels, no in-place norms), so
    ``torch.onnx.export`` and ``torch.export`` trace it. ``model`` is not modified.

    Raises:
        ValueError: a norm with batch statistics in eval (track_running_stats=False).
    """
    model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    replacements: dict[str, nn.Module] = {}
    _trace_pairs(copy.deepcopy(model), "", fold, replacements)  # a failed trace can leave Proxies in a module
    if "" in replacements:  # model is itself one norm
        return replacements[""].requires_grad_(False)
    for name, module in modules.items():
        if type(module) in CONV_WEIGHTS and name not in replacements:
            bias = None if module.bias is None else module.bias.detach()
            replacements[name] = plain_conv(module, CONV_WEIGHTS[type(module)](module), bias)
    for name, new in replacements.items():
        old = modules[name]
        if is_affine_norm(old):
            new._forward_hooks.update(old._forward_hooks)
            new._forward_pre_hooks.update(old._forward_pre_hooks)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model.eval().requires_grad_(False)
