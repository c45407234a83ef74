"""Synchronized BN + activation: batch statistics over a torch.distributed process group.

``InPlaceABNSync`` (norm=inplace_abn_sync, variant I; norm=inplace_abn_sync_ii, variant II) and
``SyncABN`` (norm=syncbn, BatchNorm + activation) normalize with the statistics of the whole
process group's batch, so N GPUs with B samples each train like one GPU with N·B samples
(InPlace-ABN, CVPR 2018, Sec. 4 "InPlace-ABN^sync", Tables 2-4).

Forward: every rank computes its per-channel (mean, biased variance, count m_r) and one
``all_gather`` exchanges them; they are merged with the parallel-variance formula
(Chan, Golub, LeVeque 1979), so per-rank batch sizes may differ and a rank may hold no sample:

    m = sum_r m_r,   mu = sum_r m_r mu_r / m,   var = sum_r m_r (var_r + (mu_r - mu)^2) / m.

The running statistics are updated with (mu, var, m) on every rank, hence identically.
Backward: one ``all_reduce`` of the per-channel [sum dL/dy, sum dL/dy * t] (t = xhat, or y for
InPlace-ABN II) gives the global sums that dL/dx needs; dL/dweight and dL/dbias are the
*local* sums (DistributedDataParallel sums/averages them like any other parameter gradient).
The math is abnexp.norm.functional's, shared with the local layers; with the native kernels
(a backend of :mod:`abnexp.norm.backends`) the local parts around the two collectives -- this rank's
statistics, the fused normalize + affine + activation pass, the backward's sums and its dL/dx
pass with the group's sums and count -- are the operators of the local layers (SyncABN then
fuses the activation as ABN does and keeps x and z).

The process group is looked up at every call (``process_group=None``: the default group), not
captured at construction or import (the reference library's issue #219: its sync layer silently
did not synchronize). Synchronization happens in training mode only; in eval mode, or when
torch.distributed is not initialized (then with a warning, once per process), or the group
has a single rank, the layers compute exactly what their local counterparts (ABN, InPlaceABN)
compute.

Empty batches: a rank with no values still joins both collectives (its count 0 and zero sums
contribute nothing); when the whole group is empty the running statistics stay untouched and the
output is empty, as ``torch.nn.BatchNorm2d`` on an empty batch -- the reference library raises for
any batch with at most one value per channel on a rank, so one rank's empty shard stops the whole
job (see :class:`~abnexp.norm.NormActBase`). One value per channel over the whole group raises.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from abnexp.errors import AbnexpError
from abnexp.norm import functional as Fn
from abnexp.norm import backends
from abnexp.norm.abn import ABN
from abnexp.norm.activations import activate
from abnexp.norm.checkpointed_bn import native_xhat_backward, no_autocast
from abnexp.norm.inplace_abn import InPlaceABN, native_backward

_warned = False


def gather_batch_statistics(x: Tensor, group, use_native: bool = False, layer: str = ""
                            ) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance of the batch of all ranks of ``group``.

    Args:
        x: this rank's input (N, C, *), N may be 0. Every rank of ``group`` must call this.
        use_native: this rank's statistics from the native ``statistics`` operator.
        layer: names the layer in the error message.
    Returns:
        (mean, var) as (C,) tensors in the compute dtype (float64 for float64 input, else
        float32) and m, the number of values per channel over the group. A rank without values
        contributes nothing; m = 0 (every rank empty) gives NaN statistics, which
        :func:`abnexp.norm.functional.update_running_stats` ignores (count 0).
    Raises:
        ValueError: m == 1 (torch BatchNorm's "Expected more than 1 value per channel").
    """
    cdt, c, count = Fn.compute_dtype(x.dtype), x.shape[1], Fn.values_per_channel(x)
    if count > 0:
        mean, var = backends.ops(x).statistics(x)[:2] if use_native else Fn.batch_statistics(x)
    else:
        mean = var = torch.zeros(c, dtype=cdt, device=x.device)
    local = torch.cat([mean.double(), var.double(),
                       torch.full((1,), float(count), dtype=torch.float64, device=x.device)])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    stats = torch.stack(parts)                                  # (ranks, 2C + 1), float64
    mean_all, var_all, total = Fn.merge_statistics(stats[:, :c], stats[:, c:2 * c], stats[:, 2 * c])
    total = int(total.item())
    if total == 1:
        raise ValueError(f"{layer + ': ' if layer else ''}Expected more than 1 value per channel when "
                         f"training, got input size "
                         f"{x.size()} on this rank and {total} value(s) per channel over the "
                         "process group")
    return mean_all.to(cdt), var_all.to(cdt), total


def all_reduce_sums(a: Tensor, b: Tensor, group) -> tuple[Tensor, Tensor]:
    """(sum over ranks of a, sum over ranks of b) for two (C,) vectors, one all_reduce."""
    both = torch.cat([a, b])
    dist.all_reduce(both, group=group)
    return both[:a.numel()], both[a.numel():]


def _group_stats(x, running_mean, running_var, factor, eps, group, use_native, layer):
    mean, var, count = gather_batch_statistics(x, group, use_native, layer)
    if running_mean is not None and running_var is not None:
        Fn.update_running_stats(running_mean, running_var, mean, var, count, factor)
    return mean, Fn.inverse_std(var, eps), count


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = gamma * xhat + beta with group statistics; keeps x, mean, invstd (standard BN).
    With ``use_native`` the activation is fused (z = phi(y)) and z is kept too."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], factor: float,
                eps: float, activation: str, param: float, use_native: bool, group, layer: str) -> Tensor:
        with no_autocast(x.device.type):
            mean, invstd, count = _group_stats(x, running_mean, running_var, factor, eps, group,
                                               use_native, layer)
            gamma, beta = Fn.affine_params(weight, bias, x.shape[1], mean.dtype, x.device)
            if use_native:
                y = backends.ops(x).forward(x, mean, invstd, gamma, beta, activation, param)
            else:
                y = Fn.forward(x, mean, invstd, gamma, beta, "identity", 0.0)
        ctx.save_for_backward(x, mean, invstd, weight, bias, *((y,) if use_native else ()))
        ctx.cfg = (count, group, activation, param, use_native)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor):
        refs = 0 if torch.compiler.is_compiling() else sys.getrefcount(dy)  # see native.grad_writable
        count, group, activation, param, use_native = ctx.cfg
        if use_native:  # the native xhat-form backward with the group's sums and count for dL/dx
            x, mean, invstd, weight, bias, y = ctx.saved_tensors
            return native_xhat_backward(ctx, dy, refs, x, y, mean, invstd, weight, bias, activation, param,
                                        True, count, lambda a, b: all_reduce_sums(a, b, group)) + (None,) * 9
        x, mean, invstd, weight, bias = ctx.saved_tensors
        with no_autocast(dy.device.type):
            xhat = Fn.normalize(x, mean, invstd, dtype=invstd.dtype)
            dy = dy.to(invstd.dtype, copy=True)  # our own buffer: grad_input_xhat writes into it
            sum_dy, sum_dy_xhat = Fn.backward_reduce(dy, xhat)
            all_dy, all_dy_xhat = all_reduce_sums(sum_dy, sum_dy_xhat, group)
            gamma, _ = Fn.affine_params(weight, bias, x.shape[1], invstd.dtype, x.device)
            dx = Fn.grad_input_xhat(dy, xhat, invstd, gamma, all_dy, all_dy_xhat, count, True,
                                    x.dtype)
            dw = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
            db = sum_dy.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None, dw, db) + (None,) * 9


class _InPlaceABNSyncFunction(torch.autograd.Function):
    """InPlace-ABN (Algorithms 1-2) with group statistics; keeps z and invstd only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], factor: float,
                eps: float, activation: str, param: float, variant: str, use_native: bool,
                group, layer: str) -> Tensor:
        with no_autocast(x.device.type):
            mean, invstd, count = _group_stats(x, running_mean, running_var, factor, eps, group,
                                               use_native, layer)
            gamma, beta = Fn.affine_params(weight, bias, x.shape[1], mean.dtype, x.device, eps=eps)
            if use_native:
                backends.ops(x).forward_(x, mean, invstd, gamma, beta, activation, param)
                z = x
            else:
                z = Fn.forward(x, mean, invstd, gamma, beta, activation, param, out=x)
        ctx.mark_dirty(z)
        ctx.save_for_backward(z, invstd, weight, bias)
        ctx.cfg = (count, eps, activation, param, variant, use_native, group)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dz: Tensor):
        refs = 0 if torch.compiler.is_compiling() else sys.getrefcount(dz)  # see native.grad_writable
        count, eps, activation, param, variant, use_native, group = ctx.cfg
        if use_native:  # InPlace-ABN's native backward with the group's sums and count for dL/dx
            return native_backward(ctx, dz, refs, eps, activation, param, variant, True, count,
                                   lambda a, b: all_reduce_sums(a, b, group)) + (None,) * 10
        z, invstd, weight, bias = ctx.saved_tensors
        with no_autocast(dz.device.type):
            gamma, beta = Fn.affine_params(weight, bias, z.shape[1], invstd.dtype, z.device, eps=eps)
            dy, t, sum_dy, sum_dy_t = Fn.inplace_backward_reduce(z, dz, gamma, beta, activation,
                                                                 param, variant)
            all_dy, all_dy_t = all_reduce_sums(sum_dy, sum_dy_t, group)
            if variant == "I":
                dgamma = sum_dy_t
                dx = Fn.grad_input_xhat(dy, t, invstd, gamma, all_dy, all_dy_t, count, True, z.dtype)
            else:
                dgamma = Fn.grad_gamma_y(sum_dy, sum_dy_t, gamma, beta)
                dx = Fn.grad_input_y(dy, t, invstd, gamma, beta, all_dy, all_dy_t, count, True,
                                     z.dtype)
            dw = Fn.flip_weight_grad(dgamma, weight) if weight is not None and ctx.needs_input_grad[1] else None
            db = sum_dy.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None, dw, db) + (None,) * 10


class _SyncMixin:
    """The process-group lookup shared by the synchronized layers."""

    def __init__(self, num_features: int, *args: Any, process_group=None, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def sync_group(self):
        """The group to synchronize with for this call, or None to compute locally."""
        global _warned
        if not self.training:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            if not _warned:
                _warned = True
                warnings.warn(f"{type(self).__name__}: torch.distributed is not initialized; the "
                              "synchronized normalization layers use this process's batch statistics "
                              "(as their local counterparts) until it is", stacklevel=3)
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None


class SyncABN(_SyncMixin, ABN):
    """BatchNorm + activation with statistics synchronized over a process group (norm=syncbn).

    Same constructor, buffers, shapes and dtypes as :class:`~abnexp.norm.ABN`, plus
    ``process_group`` (None: the default group at call time). Keeps x (and z) for backward.
    Raises ValueError as ABN does, the one-value check counting the whole group's batch.
    """

    def forward(self, x: Tensor) -> Tensor:
        group = self.sync_group()
        if group is None:
            return super().forward(x)
        self._check_input(x, local_stats=False)
        _, factor, running_mean, running_var = self._stats_mode()
        use_native = backends.enabled(x, self.activation, self.activation_param)
        act = (self.activation, self.activation_param) if use_native else ("identity", 0.0)
        y = _SyncBatchNormFunction.apply(x, self.weight, self.bias, running_mean, running_var,
                                         factor, self.eps, *act, use_native, group, self.layer_name())
        return y if use_native else activate(self.activation, y, self.activation_param)


class InPlaceABNSync(_SyncMixin, InPlaceABN):
    """InPlace-ABN (variant "I" or "II") with statistics synchronized over a process group
    (norm=inplace_abn_sync / inplace_abn_sync_ii; the paper's InPlace-ABN^sync).

    Same constructor, semantics (effective scale |weight| + eps, output written into the
    input) and errors as :class:`~abnexp.norm.InPlaceABN`, plus ``process_group`` (None: the
    default group at call time). Keeps z and the (C,) 1/sigma for backward.
    """

    def forward(self, x: Tensor) -> Tensor:
        group = self.sync_group()
        if group is None:
            return super().forward(x)
        self._check_input(x, local_stats=False)
        _, factor, running_mean, running_var = self._stats_mode()
        return _InPlaceABNSyncFunction.apply(x, self.weight, self.bias, running_mean, running_var,
                                             factor, self.eps, self.activation,
                                             self.activation_param, self.variant,
                                             backends.enabled(x, self.activation, self.activation_param),
                                             group, self.layer_name())


SYNC_LAYERS = (SyncABN, InPlaceABNSync)


class StatisticsMismatch(AbnexpError):
    """Running statistics differ between ranks that should share them."""


def set_process_group(model: torch.nn.Module, group) -> int:
    """Makes every synchronized layer of ``model`` synchronize over ``group`` (None: the
    default group); returns how many layers were set."""
    layers = [m for m in model.modules() if isinstance(m, SYNC_LAYERS)]
    for m in layers:
        m.process_group = group
    return len(layers)


@torch.no_grad()
def check_running_stats_synchronized(model: torch.nn.Module) -> None:
    """Checks that every synchronized layer holds the same running_mean / running_var on all
    ranks of its process group (exact equality). A collective: call it on every rank.

    Raises:
        StatisticsMismatch: on every rank, naming the first layer that differs.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, SYNC_LAYERS) and m.running_mean is not None]
    if not layers:
        return
    diffs = torch.zeros(len(layers), dtype=torch.float64, device=layers[0][1].running_mean.device)
    groups: dict[int, list[int]] = {}
    for i, (_, m) in enumerate(layers):
        groups.setdefault(id(m.process_group), []).append(i)
    for indices in groups.values():
        group = layers[indices[0]][1].process_group
        mine = torch.cat([torch.cat([layers[i][1].running_mean, layers[i][1].running_var]).double()
                          for i in indices])
        first = mine.clone()
        dist.broadcast(first, group=group, group_src=0)
        sizes = [2 * layers[i][1].num_features for i in indices]
        for i, d in zip(indices, (mine - first).abs().split(sizes)):
            diffs[i] = d.max()
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    bad = torch.nonzero(diffs).flatten().tolist()
    if bad:
        name = layers[bad[0]][0]
        raise StatisticsMismatch(
            f"running statistics differ across ranks in {len(bad)} synchronized layer(s), first "
            f"{name or '<root>'} (max |difference| {diffs[bad[0]].item():.3g}); the layers did not "
            "synchronize, so no checkpoint was written")
