"""Swap the BN + activation strategy of a built model, preserving the computed function."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from abnexp.norm.base import NormActBase
from abnexp.norm.activations import is_invertible
from abnexp.norm.registry import NORMS

NEGATIVE_GAMMA_POLICIES = ("raise", "abs")


def _effective_gamma(layer: NormActBase) -> torch.Tensor:
    """The scale the layer actually applies to xhat: weight, or |weight| + eps in place."""
    w = layer.weight.detach()
    return w.abs() + layer.eps if layer.inplace else w.clone()


def _describe(name: str) -> str:
    return repr(name) if name else "<root module>"


def convert(model: nn.Module, to: str, *, negative_gamma: str = "raise") -> nn.Module:
    """Replace every ABN / CheckpointedABN / InPlaceABN layer of ``model`` by strategy ``to``.

    The model is modified in place (its parent modules get the new layers) and returned;
    if ``model`` itself is such a layer the new layer is returned. Each new layer keeps the
    old one's num_features, eps, momentum, affine, track_running_stats, activation and
    activation_param, its running statistics and num_batches_tracked, device, dtype,
    ``requires_grad`` flags and train/eval mode. Other modules are untouched.

    The *function* is preserved, not the raw parameter values: in-place layers apply the
    effective scale ``|weight| + eps`` (see :class:`~abnexp.norm.InPlaceABN`), so
    - in-place -> non-in-place: ``weight_new = |weight| + eps`` (exact);
    - non-in-place -> in-place: ``weight_new = max(weight - eps, 0)`` (exact for
      weight >= eps; channels with 0 <= weight < eps get the scale eps, a change of at
      most ``eps * |xhat|``);
    - in-place <-> in-place and non-in-place <-> non-in-place: copied unchanged.
    Converting back and forth therefore reproduces the original parameters up to float
    rounding (for weights >= eps).

    Negative weights cannot be represented by an in-place layer (its scale is always
    positive). With ``negative_gamma="raise"`` (default) converting them to an in-place
    strategy raises a ``ValueError`` naming each layer and its count of negative channels;
    with ``negative_gamma="abs"`` they are converted as ``max(|weight| - eps, 0)`` -- this
    changes the function of those channels (the sign of their BN output flips) -- and a
    ``UserWarning`` with the same listing is emitted.

    Args:
        model: any module.
        to: "bn", "checkpoint", "checkpoint_proposed", "inplace_abn" or "inplace_abn_ii".
        negative_gamma: "raise" or "abs" (see above).

    Raises:
        ValueError: unknown ``to`` or ``negative_gamma``; an in-place target with a layer
            whose activation is not invertible (e.g. relu; the layers are named); negative
            weights with ``negative_gamma="raise"``. Nothing is modified when raising.
    """
    if to not in NORMS:
        raise ValueError(f"unknown norm {to!r}; valid norms: {', '.join(NORMS)}")
    if negative_gamma not in NEGATIVE_GAMMA_POLICIES:
        raise ValueError(f"negative_gamma must be one of {NEGATIVE_GAMMA_POLICIES}, "
                         f"got {negative_gamma!r}")
    spec = NORMS[to]
    to_inplace = spec.inplace
    sites = [(n, m) for n, m in model.named_modules() if isinstance(m, NormActBase)]

    problems, negatives = [], []
    for name, layer in sites:
        if to_inplace and not is_invertible(layer.activation, layer.activation_param):
            problems.append(f"{_describe(name)} uses activation={layer.activation!r} "
                            f"(param {layer.activation_param}), which is not invertible")
        elif not to_inplace and spec.check_activation is not None:
            try:
                spec.check_activation(layer.activation, layer.activation_param, _describe(name))
            except ValueError as err:
                problems.append(str(err))
        if to_inplace and layer.affine and not layer.inplace:
            count = int((layer.weight.detach() < 0).sum())
            if count:
                negatives.append(f"{_describe(name)}: {count} of {layer.num_features} "
                                 f"channels have weight < 0")
    if problems:
        raise ValueError(f"cannot convert to {to!r}: " + "; ".join(problems) +
                         ". In-place strategies need leaky_relu (slope > 0), elu or "
                         "identity; keep these layers as 'bn'/'checkpoint'.")
    if negatives:
        message = (f"converting to {to!r}: the in-place layers apply the scale |weight| + eps, "
                   f"so negative BatchNorm weights cannot be represented: "
                   + "; ".join(negatives))
        if negative_gamma == "raise":
            raise ValueError(message + ". Pass negative_gamma='abs' to convert them as "
                             "|weight| (this changes the model's function), or keep 'bn'.")
        warnings.warn(message + "; converted as |weight| (the function of these channels "
                      "changes).", UserWarning, stacklevel=2)

    factory = spec.layer
    replaced: dict[int, nn.Module] = {}
    for _, layer in sites:
        replaced[id(layer)] = _convert_layer(layer, factory, to_inplace)
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replaced:
                parent._modules[key] = replaced[id(child)]
    return replaced.get(id(model), model)


def _convert_layer(layer: NormActBase, factory, to_inplace: bool) -> nn.Module:
    ref = next(iter(list(layer.parameters()) + list(layer.buffers())), None)
    factory_kwargs = {}
    if ref is not None:
        factory_kwargs["device"] = ref.device
        if ref.is_floating_point():
            factory_kwargs["dtype"] = ref.dtype
    new = factory(layer.num_features, eps=layer.eps, momentum=layer.momentum,
                  affine=layer.affine, track_running_stats=layer.track_running_stats,
                  activation=layer.activation, activation_param=layer.activation_param,
                  **factory_kwargs)
    with torch.no_grad():
        if layer.affine:
            if to_inplace == layer.inplace:
                weight = layer.weight.detach().clone()
            elif to_inplace:
                weight = (layer.weight.detach().abs() - layer.eps).clamp_(min=0)
            else:
                weight = _effective_gamma(layer)
            new.weight.copy_(weight)
            new.bias.copy_(layer.bias.detach())
            new.weight.requires_grad_(layer.weight.requires_grad)
            new.bias.requires_grad_(layer.bias.requires_grad)
        if layer.track_running_stats:
            new.running_mean.copy_(layer.running_mean)
            new.running_var.copy_(layer.running_var)
            new.num_batches_tracked.copy_(layer.num_batches_tracked)
    new.train(layer.training)
    return new
