"""The normalization batch (``norm.group_size``) and helpers shared by the small-batch layers.

The MABN paper (Yan et al., ICLR 2020, Sec. 5.1 and Table 1) separates the *gradient batch*
(the samples of one optimizer step, 32 per GPU) from the *normalization batch* (the samples a
normalization layer computes its statistics over, 2 in the small-batch setting): the per-process
batch is split into groups of ``group_size`` consecutive samples and every group is normalized
with its own statistics. With ``group_size = 0`` (default) the whole batch is one group.

Convention (the same for every layer that supports it: bn, brn, mabn, cbn): the groups are
processed in batch order, each as one *normalization batch* -- running statistics
(``num_batches_tracked``), MABN's statistic buffers and CBN's window advance once per group,
as in a run whose batch is ``group_size`` (MABN's backward visits the groups in batch order
too, so its gradient statistics see the same window as consecutive calls would). Schedules count training *iterations*, i.e.
training-mode calls of the layer (``num_steps``, one per optimizer step in the usual loop), as
the papers' iteration counts do: MABN's ``warmup_iters`` and r warm-up, BRN's r_max/d_max
schedule, CBN's ``burnin_iters``. All groups of a call see the same weights (so CBN needs no
Taylor compensation between them).
A batch whose size is not a multiple of ``group_size`` ends with one smaller group (as
``torch.split``). Grouping applies only where batch statistics are used (training, or
``track_running_stats=False``); evaluation with running statistics is per sample anyway.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from abnexp.norm.abn import ABN
from abnexp.norm.functional import channel


def split_groups(x: Tensor, group_size: int) -> tuple[Tensor, ...]:
    """(N, C, *) -> consecutive groups of ``group_size`` samples (views, dim 0; the last one may
    be smaller); 0 or ``group_size >= N``: the whole batch as one group.

    Raises:
        ValueError: negative ``group_size``.
    """
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0 (0 = whole batch), got {group_size}")
    return (x,) if group_size == 0 or x.shape[0] <= group_size else x.split(group_size)


def for_each_group(fn: Callable[[Tensor], Tensor], group_size: int, x: Tensor) -> Tensor:
    """``fn`` applied to each group of :func:`split_groups`, outputs concatenated: (N, ...)."""
    groups = split_groups(x, group_size)
    return fn(x) if len(groups) == 1 else torch.cat([fn(g) for g in groups])


class GroupedABN(ABN):
    """:class:`~abnexp.norm.ABN` (BatchNorm + activation, ``norm=bn``) with a normalization
    batch of ``group_size`` samples (see the module docstring).

    Same constructor as ABN plus ``group_size`` (int >= 0), same parameters and buffers (a
    state dict loads into either class). Training: (N, C, *) -> (N, C, *), each group of
    ``group_size`` consecutive samples normalized with its own batch statistics, running
    statistics updated once per group (``num_batches_tracked`` counts groups). Eval with
    running statistics: identical to ABN.

    Raises:
        ValueError: negative ``group_size``; a group with one value per channel in training.
    """

    def __init__(self, num_features: int, *args, group_size: int = 0, **kwargs) -> None:
        if group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = whole batch), got {group_size}")
        super().__init__(num_features, *args, **kwargs)
        self.group_size = int(group_size)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training or self.running_mean is None) or x.numel() == 0:
            return super().forward(x)  # an empty input is one call, as for ABN
        return for_each_group(super().forward, self.group_size, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def refuse_recompute(layer: str) -> None:
    """Raise ``RuntimeError`` when called during a backward pass (activation checkpointing).
    Not checked while ``torch.compile`` traces the layer (the check is a host-side query that
    Dynamo cannot put in a graph; a compiled forward is not re-entered by eager checkpointing)."""
    if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
        raise RuntimeError(
            f"{layer} keeps statistics across iterations and cannot be recomputed during "
            f"backward (activation checkpointing would count the iteration twice and normalize "
            f"with updated buffers). Do not wrap {layer} layers in torch.utils.checkpoint.")


def affine_normalize(x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                     bias: Optional[Tensor]) -> Tensor:
    """gamma * (x - mean) * invstd + beta as ``x * a + b`` with per-channel (C,) a, b (as torch's
    CPU BatchNorm kernel folds it), so autograd keeps only x for backward, not full-size
    intermediates. ``x`` (N, C, *) in the compute dtype; gradients flow through every argument."""
    scale = invstd if weight is None else invstd * weight.to(x.dtype)
    shift = -mean * scale if bias is None else bias.to(x.dtype) - mean * scale
    return torch.addcmul(channel(shift, x), x, channel(scale, x))
