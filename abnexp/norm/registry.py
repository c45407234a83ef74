"""The norm table: one entry per ``norm=`` option, carrying everything about it.

==========================  ==============================================  =======================================
norm name                   layer                                           source
==========================  ==============================================  =======================================
``bn``                      :class:`ABN` (:class:`GroupedABN` with groups)  InPlace-ABN (CVPR 2018) Fig. 2a
``checkpoint``              :class:`CheckpointedABN` (baseline)             InPlace-ABN Fig. 2b
``checkpoint_proposed``     :class:`CheckpointedABN` (proposed)             InPlace-ABN Fig. 2c
``inplace_abn``             :class:`InPlaceABN` (I)                         InPlace-ABN Fig. 2d, §3.2
``inplace_abn_ii``          :class:`InPlaceABN` (II)                        InPlace-ABN Fig. 2e, §3.3
``syncbn``                  :class:`SyncABN`                                InPlace-ABN §4 ("sync" rows)
``inplace_abn_sync[_ii]``   :class:`InPlaceABNSync` (I / II)                InPlace-ABN Tables 2-4, "sync" rows
``mabn``                    :class:`MABN2d` + :class:`CenConv2d` convs      MABN (ICLR 2020) Algorithm 1, §4.3
``cbn``                     :class:`CBN2d`, paired with the conv before it  CBN (CVPR 2021) Algorithm 1, Eqs. 7-12
``brn``                     :class:`BatchRenorm2d`                          Ioffe (NIPS 2017) Algorithm 1
``gn``                      :class:`GroupNormAct` (32 groups)               Wu & He (ECCV 2018)
``frozen_bn``               :class:`FrozenBatchNorm2d`                      CBN Table 5 ("fixed BN")
==========================  ==============================================  =======================================

An entry (:class:`NormSpec`) holds the layer builder, the option's schema (a dataclass extending
:class:`abnexp.config.NormConfig`, stored as Hydra's schema of ``configs/norm/<name>.yaml``, so a
key the option does not have fails at composition), the convolution that feeds its layers, whether
its layers take the preceding convolution, and whether they overwrite their input (in place).
Adding a norm = its layer module, an entry here, its YAML file.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial
from typing import Callable, Optional

from torch import nn

from abnexp.config import NormConfig
from abnexp.norm.abn import ABN
from abnexp.norm.activations import check_invertible, check_output_form
from abnexp.norm.brn import BatchRenorm2d
from abnexp.norm.cbn import CBN2d
from abnexp.norm.checkpointed_bn import CheckpointedABN
from abnexp.norm.frozen_bn import FrozenBatchNorm2d
from abnexp.norm.group_norm import GroupNormAct
from abnexp.norm.grouping import GroupedABN
from abnexp.norm.inplace_abn import InPlaceABN
from abnexp.norm.mabn import CenConv2d, MABN2d
from abnexp.norm.sync import InPlaceABNSync, SyncABN


# --- the options (Hydra schemas) ------------------------------------------------------------------
@dataclass
class BatchNormOptions(NormConfig):
    """Strategies with running statistics: momentum of their update (None: cumulative average)."""

    momentum: Optional[float] = 0.1


@dataclass
class GroupedBatchNormOptions(BatchNormOptions):
    """``group_size``: the normalization batch -- statistics over groups of this many consecutive
    samples (0 = the whole per-process batch; MABN paper §5.1, "normalization batch size")."""

    group_size: int = 0


@dataclass
class MABNOptions(GroupedBatchNormOptions):
    """MABN (Yan et al., ICLR 2020, Algorithm 1): ``buffer_size`` normalization batches in the
    simple moving averages; ``warmup_iters`` iterations normalized by the current batch."""

    momentum: Optional[float] = 0.02  # the reference's 0.98 on the old running_var
    buffer_size: int = 16
    warmup_iters: int = 100


@dataclass
class CBNOptions(GroupedBatchNormOptions):
    """Cross-Iteration BN (Yao et al., CVPR 2021, Algorithm 1): statistics of the last ``window``
    iterations, past ones Taylor-compensated (Eq. 7); plain BN for ``burnin_iters``; Eq. 10's
    handling of invalid variances (``max``) or the released code's (``drop``)."""

    window: int = 4
    burnin_iters: int = 0
    invalid_stats: str = "max"


@dataclass
class BRNOptions(GroupedBatchNormOptions):
    """Batch Renormalization (Ioffe, NIPS 2017, Algorithm 1): final clips ``r_max`` / ``d_max``,
    reached by linear ramps starting at ``renorm_start_iters`` (r_max = 1, d_max = 0 before)."""

    r_max: float = 3.0
    d_max: float = 5.0
    renorm_start_iters: int = 5000
    r_max_iters: int = 40000
    d_max_iters: int = 25000


@dataclass
class PerSampleOptions(NormConfig):
    """GroupNorm / frozen BN: no batch statistics; ``group_size`` is accepted so that one small-batch
    sweep can set it for every norm, and has nothing to group."""

    group_size: int = 0


# --- the table -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormSpec:
    """Everything about one ``norm=`` option.

    Attributes:
        layer: builds one layer: ``layer(num_features, eps=..., activation=..., activation_param=...,
            **option keys)`` -> module mapping (N, C, H, W) to (N, C, H, W).
        options: the option's schema dataclass (a :class:`NormConfig` subclass); its keys beyond
            name/activation/activation_param are the layer's keyword arguments.
        conv: constructor of every convolution that feeds one of its layers (``nn.Conv2d`` signature).
        takes_conv: the layer receives the convolution whose output it normalizes (``conv=``).
        inplace: the layer overwrites its input (InPlace-ABN): the activation must be invertible.
        check_activation: ``(activation, param, where)`` -> None or ValueError, checked before any
            layer is built; None where autograd differentiates the activation.
        ignores: schema keys the layer accepts for uniformity and does not use.
    """

    layer: Callable[..., nn.Module]
    options: type
    conv: Callable[..., nn.Module] = nn.Conv2d
    takes_conv: bool = False
    inplace: bool = False
    check_activation: Optional[Callable[[str, float, str], None]] = None
    ignores: tuple[str, ...] = ()

    def layer_keys(self) -> tuple[str, ...]:
        """The option keys passed to :attr:`layer` (all but name, activation and its parameter)."""
        return tuple(f.name for f in fields(self.options)
                     if f.name not in ("name", "activation", "activation_param") and f.name not in self.ignores)


def _abn(num_features: int, group_size: int = 0, **kwargs) -> nn.Module:
    """ABN, or :class:`GroupedABN` with statistics over groups of ``group_size`` samples."""
    return GroupedABN(num_features, group_size=group_size, **kwargs) if group_size else ABN(num_features, **kwargs)


_INPLACE = {"inplace": True, "check_activation": check_invertible}
NORMS: dict[str, NormSpec] = {
    "bn": NormSpec(_abn, GroupedBatchNormOptions),
    "checkpoint": NormSpec(partial(CheckpointedABN, variant="baseline"), BatchNormOptions,
                           check_activation=check_output_form),
    "checkpoint_proposed": NormSpec(partial(CheckpointedABN, variant="proposed"), BatchNormOptions,
                                    check_activation=check_output_form),
    "inplace_abn": NormSpec(partial(InPlaceABN, variant="I"), BatchNormOptions, **_INPLACE),
    "inplace_abn_ii": NormSpec(partial(InPlaceABN, variant="II"), BatchNormOptions, **_INPLACE),
    "mabn": NormSpec(MABN2d, MABNOptions, conv=CenConv2d),
    "cbn": NormSpec(CBN2d, CBNOptions, takes_conv=True),
    "brn": NormSpec(BatchRenorm2d, BRNOptions),
    "gn": NormSpec(GroupNormAct, PerSampleOptions, ignores=("group_size",)),
    "frozen_bn": NormSpec(FrozenBatchNorm2d, PerSampleOptions, ignores=("group_size",)),
    "syncbn": NormSpec(SyncABN, BatchNormOptions, check_activation=check_output_form),
    "inplace_abn_sync": NormSpec(partial(InPlaceABNSync, variant="I"), BatchNormOptions, **_INPLACE),
    "inplace_abn_sync_ii": NormSpec(partial(InPlaceABNSync, variant="II"), BatchNormOptions, **_INPLACE),
}
"""norm name -> its entry (the ``norm=`` options of configs/norm/)."""
