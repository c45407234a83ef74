"""Normalization + activation layers and the factory every model is built from.

The strategies (one ``norm=`` option each) are the entries of :data:`NORMS`
(:mod:`abnexp.norm.registry`, which tabulates them with their papers). Models receive a
:class:`NormAct` built by :func:`build_norm_act`; :func:`convert` swaps the strategy of a built
model (InPlace-ABN paper §3.2: the |γ| + ε scale of the in-place strategies).
"""
from __future__ import annotations

from abnexp.norm.abn import ABN
from abnexp.norm.base import NormActBase
from abnexp.norm.activations import ACTIVATIONS, get_activation, is_invertible, make_activation
from abnexp.norm.brn import BatchRenorm2d
from abnexp.norm.cbn import CBN2d
from abnexp.norm.checkpointed_bn import CheckpointedABN
from abnexp.norm.convert import convert
from abnexp.norm.factory import NormAct
from abnexp.norm.frozen_bn import FrozenBatchNorm2d
from abnexp.norm.group_norm import GroupNormAct
from abnexp.norm.grouping import GroupedABN
from abnexp.norm.inplace_abn import InPlaceABN
from abnexp.norm.mabn import CenConv2d, MABN2d
from abnexp.norm.registry import NORMS, NormSpec
from abnexp.norm.sync import InPlaceABNSync, SyncABN

NORM_LAYERS = {name: spec.layer for name, spec in NORMS.items()}
"""norm name -> layer builder with the reference-library constructor signature (a view of NORMS)."""

INPLACE_NORMS = frozenset(name for name, spec in NORMS.items() if spec.inplace)


def build_norm_act(name: str, activation: str = "leaky_relu", activation_param: float = 0.01,
                   **options) -> NormAct:
    """The :class:`NormAct` factory of strategy ``name`` with the given defaults.

    Args:
        name: a key of :data:`NORMS`.
        activation, activation_param: default activation of every layer (a model may
            override it per call, e.g. ``norm_act(c, activation="identity")``).
        **options: keys of the strategy's schema (``NORMS[name].options``: eps, momentum,
            group_size, window, ...); missing keys take the schema's defaults. A composed
            ``cfg.norm`` passes as ``build_norm_act(**cfg.norm)``.

    Raises:
        ValueError: unknown ``name`` (lists the valid ones), unknown activation, an activation
            the strategy cannot use (an in-place strategy with relu or slope/alpha <= 0), or an
            option the strategy does not have (naming the norms that have it).
    """
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; valid norms: {', '.join(NORMS)}")
    spec = NORMS[name]
    get_activation(activation)
    if spec.check_activation is not None:
        spec.check_activation(activation, activation_param, f"norm={name!r}")
    defaults = spec.options()
    for key in options:
        if not hasattr(defaults, key):
            owners = [n for n, s in NORMS.items() if hasattr(s.options(), key)]
            raise ValueError(f"norm.{key}={options[key]!r} applies to norm={'/'.join(owners) or '(none)'} only, "
                             f"not to norm={name!r}")
    kwargs = {key: options.get(key, getattr(defaults, key)) for key in spec.layer_keys()}
    kwargs["eps"] = float(kwargs["eps"])
    return NormAct(layer=spec.layer, activation=activation, activation_param=float(activation_param),
                   kwargs=kwargs, name=name, conv=spec.conv, takes_conv=spec.takes_conv)


__all__ = ["ABN", "CheckpointedABN", "InPlaceABN", "InPlaceABNSync", "SyncABN", "MABN2d", "CenConv2d",
           "CBN2d", "BatchRenorm2d", "GroupNormAct", "FrozenBatchNorm2d", "GroupedABN", "NormActBase",
           "NormAct", "NormSpec", "NORMS", "NORM_LAYERS", "INPLACE_NORMS", "ACTIVATIONS", "build_norm_act",
           "convert", "make_activation", "is_invertible"]
