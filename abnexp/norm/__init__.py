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

Small-batch normalizations (MABN, CBN papers; shared/reference/small_batch_norms.md):
``mabn`` :class:`MABN2d` (+ :class:`CenConv2d` for every conv built by the factory), ``cbn``
:class:`CBN2d` (paired with the conv before it), ``brn`` :class:`BatchRenorm2d`, ``gn``
:class:`GroupNormAct` (32 groups), ``frozen_bn`` :class:`FrozenBatchNorm2d`. ``group_size``
(normalization batch, :mod:`abnexp.norm.grouping`) applies to bn, brn, mabn and cbn.

Models receive a :class:`NormAct` built by :func:`build_norm_act`; :func:`convert` swaps
the strategy of a built model.
"""
from __future__ import annotations

import inspect
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
from abnexp.norm.brn import BatchRenorm2d
from abnexp.norm.cbn import CBN2d
from abnexp.norm.frozen_bn import FrozenBatchNorm2d
from abnexp.norm.group_norm import GroupNormAct
from abnexp.norm.grouping import GroupedABN
from abnexp.norm.mabn import CenConv2d, MABN2d
from abnexp.norm.sync import InPlaceABNSync, SyncABN

NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "bn": ABN,
    "checkpoint": partial(CheckpointedABN, variant="baseline"),
    "checkpoint_proposed": partial(CheckpointedABN, variant="proposed"),
    "inplace_abn": partial(InPlaceABN, variant="I"),
    "inplace_abn_ii": partial(InPlaceABN, variant="II"),
    "mabn": MABN2d,
    "cbn": CBN2d,
    "brn": BatchRenorm2d,
    "gn": GroupNormAct,
    "frozen_bn": FrozenBatchNorm2d,
    "syncbn": SyncABN,
    "inplace_abn_sync": partial(InPlaceABNSync, variant="I"),
    "inplace_abn_sync_ii": partial(InPlaceABNSync, variant="II"),
}
"""norm name -> layer factory with the reference-library constructor signature."""

SMALL_BATCH_OPTIONS: dict[str, tuple[str, ...]] = {
    "group_size": ("bn", "brn", "mabn", "cbn", "gn", "frozen_bn"),  # gn, frozen_bn: no batch statistics, no-op
    "buffer_size": ("mabn",), "warmup_iters": ("mabn",),
    "window": ("cbn",), "burnin_iters": ("cbn",), "invalid_stats": ("cbn",),
    "r_max": ("brn",), "d_max": ("brn",), "renorm_start_iters": ("brn",), "r_max_iters": ("brn",),
    "d_max_iters": ("brn",),
}
"""build_norm_act option -> the norms it applies to; another norm with a non-default value is an error."""

INPLACE_NORMS = frozenset({"inplace_abn", "inplace_abn_ii", "inplace_abn_sync", "inplace_abn_sync_ii"})


def build_norm_act(name: str, activation: str = "leaky_relu", activation_param: float = 0.01,
                   eps: float = 1e-5, momentum: Optional[float] = 0.1, group_size: int = 0,
                   buffer_size: int = 16, warmup_iters: int = 100, window: int = 4,
                   burnin_iters: int = 0, invalid_stats: str = "max", r_max: float = 3.0,
                   d_max: float = 5.0, renorm_start_iters: int = 5000, r_max_iters: int = 40000,
                   d_max_iters: int = 25000) -> NormAct:
    """The :class:`NormAct` factory of strategy ``name`` with the given defaults.

    Args:
        name: a key of :data:`NORM_LAYERS`.
        activation, activation_param: default activation of every layer (a model may
            override it per call, e.g. ``norm_act(c, activation="identity")``).
        eps, momentum: BatchNorm settings (``momentum=None``: cumulative average).
        group_size: normalization batch of bn / brn / mabn / cbn (0 = whole batch; a no-op
            for gn and frozen_bn), see :mod:`abnexp.norm.grouping`.
        buffer_size, warmup_iters: MABN (:class:`MABN2d`).
        window, burnin_iters, invalid_stats: CBN (:class:`CBN2d`).
        r_max, d_max, renorm_start_iters, r_max_iters, d_max_iters: BRN (:class:`BatchRenorm2d`).

    Raises:
        ValueError: unknown ``name`` (lists the valid ones), unknown activation, an
            in-place strategy with a non-invertible activation (relu, slope/alpha <= 0), or
            a non-default option of :data:`SMALL_BATCH_OPTIONS` that ``name`` does not use.
    """
    if name not in NORM_LAYERS:
        raise ValueError(f"unknown norm {name!r}; valid norms: {', '.join(NORM_LAYERS)}")
    get_activation(activation)
    if name in INPLACE_NORMS:
        check_invertible(activation, activation_param, f"norm={name!r}")
    elif name != "bn" and name not in ("mabn", "cbn", "brn", "gn", "frozen_bn"):  # autograd activations
        check_output_form(activation, activation_param, f"norm={name!r}")
    options = {"group_size": group_size, "buffer_size": buffer_size, "warmup_iters": warmup_iters,
               "window": window, "burnin_iters": burnin_iters, "invalid_stats": invalid_stats,
               "r_max": r_max, "d_max": d_max, "renorm_start_iters": renorm_start_iters,
               "r_max_iters": r_max_iters, "d_max_iters": d_max_iters}
    defaults = inspect.signature(build_norm_act).parameters
    for key, norms in SMALL_BATCH_OPTIONS.items():
        if name not in norms and options[key] != defaults[key].default:
            raise ValueError(f"norm.{key}={options[key]!r} applies to norm={'/'.join(norms)} only, "
                             f"not to norm={name!r}")
    kwargs = {"eps": float(eps), "momentum": momentum}
    if name in ("mabn", "cbn", "brn"):
        kwargs.update({k: v for k, v in options.items() if name in SMALL_BATCH_OPTIONS[k]})
    layer = partial(GroupedABN, group_size=group_size) if name == "bn" and group_size else NORM_LAYERS[name]
    return NormAct(layer=layer, activation=activation, activation_param=float(activation_param),
                   kwargs=kwargs, name=name, conv=CenConv2d if name == "mabn" else nn.Conv2d,
                   takes_conv=name == "cbn")


__all__ = ["ABN", "CheckpointedABN", "InPlaceABN", "MABN2d", "CenConv2d", "CBN2d", "BatchRenorm2d",
           "GroupNormAct", "FrozenBatchNorm2d", "GroupedABN", "SMALL_BATCH_OPTIONS", "NormActBase", "NormAct",
           "NORM_LAYERS",
           "INPLACE_NORMS", "ACTIVATIONS", "build_norm_act", "convert", "make_activation",
           "is_invertible"]
