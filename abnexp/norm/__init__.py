"""Normalization + activation layers: the five strategies of InPlace-ABN (CVPR 2018).

==========================  =============================================  ============================
norm name                   layer                                          paper strategy (Fig. 2)
==========================  =============================================  ============================
``bn``                      :class:`ABN`                                   standard (a)
``checkpoint``              :class:`CheckpointedABN` (variant baseline)    checkpointing, baseline (b)
``checkpoint_proposed``     :class:`CheckpointedABN` (variant proposed)    checkpointing, proposed (c)
``inplace_abn``             :class:`InPlaceABN` (variant I)                InPlace-ABN I (d)
``inplace_abn_ii``          :class:`InPlaceABN` (variant II)               InPlace-ABN II (e)
==========================  =============================================  ============================

Models receive a :class:`NormAct` built by :func:`build_norm_act`; :func:`convert` swaps
the strategy of a built model.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

from torch import nn

from abnexp.norm.abn import ABN, NormActBase
from abnexp.norm.activations import (ACTIVATIONS, check_invertible, check_output_form,
                                     get_activation, is_invertible, make_activation)
from abnexp.norm.checkpoint import CheckpointedABN
from abnexp.norm.convert import convert
from abnexp.norm.factory import NormAct
from abnexp.norm.inplace_abn import InPlaceABN

NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "bn": ABN,
    "checkpoint": partial(CheckpointedABN, variant="baseline"),
    "checkpoint_proposed": partial(CheckpointedABN, variant="proposed"),
    "inplace_abn": partial(InPlaceABN, variant="I"),
    "inplace_abn_ii": partial(InPlaceABN, variant="II"),
}
"""norm name -> layer factory with the reference-library constructor signature."""

INPLACE_NORMS = frozenset({"inplace_abn", "inplace_abn_ii"})


def build_norm_act(name: str, activation: str = "leaky_relu", activation_param: float = 0.01,
                   eps: float = 1e-5, momentum: Optional[float] = 0.1) -> NormAct:
    """The :class:`NormAct` factory of strategy ``name`` with the given defaults.

    Args:
        name: a key of :data:`NORM_LAYERS`.
        activation, activation_param: default activation of every layer (a model may
            override it per call, e.g. ``norm_act(c, activation="identity")``).
        eps, momentum: BatchNorm settings (``momentum=None``: cumulative average).

    Raises:
        ValueError: unknown ``name`` (lists the valid ones), unknown activation, or an
            in-place strategy with a non-invertible activation (relu, slope/alpha <= 0).
    """
    if name not in NORM_LAYERS:
        raise ValueError(f"unknown norm {name!r}; valid norms: {', '.join(NORM_LAYERS)}")
    get_activation(activation)
    if name in INPLACE_NORMS:
        check_invertible(activation, activation_param, f"norm={name!r}")
    elif name != "bn":
        check_output_form(activation, activation_param, f"norm={name!r}")
    return NormAct(layer=NORM_LAYERS[name], activation=activation,
                   activation_param=float(activation_param),
                   kwargs={"eps": float(eps), "momentum": momentum}, name=name)


__all__ = ["ABN", "CheckpointedABN", "InPlaceABN", "NormActBase", "NormAct", "NORM_LAYERS",
           "INPLACE_NORMS", "ACTIVATIONS", "build_norm_act", "convert", "make_activation",
           "is_invertible"]
