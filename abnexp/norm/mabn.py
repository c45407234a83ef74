"""Moving Average Batch Normalization (MABN) + activation, and the weight-centralized conv.

Source: Yan, Wan, Zhang, Zhang, Wei, Sun, "Towards Stabilizing Batch Statistics in Backward
Propagation of Batch Normalization" (ICLR 2020), Sec. 4 (moving-average statistics in forward
*and* backward, the uncentred "modified normalization" of Sec. 4.2, weight centralization), as
the authors' code (megvii-model/MABN) computes it (Algorithm 1 of the paper).

Per channel, with reductions over N and the spatial positions, at training iteration t (the
first is 1; ``num_steps``), normalization batch n (``num_batches_tracked``; n = t unless
``group_size`` splits the batch), buffer size m:

* forward: ``x2 = mean(x^2)`` is written to ``buffer_x2[n mod m]``; ``var = x2`` during the
  warm-up (``n <= m`` or ``t < warmup_iters``), else the simple moving average
  ``mean(buffer_x2)``; ``z = x / sqrt(var + eps)``; ``r = sqrt(var + eps) / sqrt(running_var +
  eps)`` (running_var from before this update) clamped to [1/5, 5], ``r = 1`` while
  ``t <= max(r_warmup_iters, warmup_iters)``; ``y = gamma * r * z + beta``; then
  ``running_var <- (1 - momentum) * running_var + momentum * var``. No mean is subtracted.
* backward (custom, r a constant): ``g = dL/dy * gamma * r``, ``gz = mean(g * z)`` (Psi_B) is
  written to ``buffer_gz[n mod m]``; ``Psi = gz`` during the warm-up, else ``mean(buffer_gz)``;
  ``dL/dx = (g - z * Psi) / sqrt(var + eps)``, ``dL/dgamma = sum(dL/dy * r * z)``,
  ``dL/dbeta = sum(dL/dy)``.
* inference: ``y = gamma * x / sqrt(running_var + eps) + beta`` (linear in x, foldable into the
  preceding conv; ``running_mean`` is kept at 0 so this is exactly ``F.batch_norm``).

``momentum`` follows torch's convention (factor of the *new* value): the reference's 0.98 on
the old value is ``momentum=0.02`` here.

State across iterations (all registered buffers, so checkpoints save and resume restores
them): ``buffer_x2`` and ``buffer_gz`` (m, C), ``running_var``, ``num_steps`` and
``num_batches_tracked`` (the counters t and n). Deviations from the reference, where it
corrupts its buffers:

* an empty batch (N = 0) leaves every buffer untouched;
* each training-mode call is one iteration that owns its buffer slot: its backward writes its
  Psi_B into the slot its forward wrote x2 to, so a layer called several times per optimizer
  step (a head shared across inputs) keeps consistent buffers -- each call counts as one
  iteration (with ``norm.group_size`` each group owns a slot, see :mod:`abnexp.norm.grouping`);
* activation checkpointing is refused: a forward recomputed during backward
  (``torch.utils.checkpoint``) would count a second iteration and see updated buffers, so it
  raises ``RuntimeError``; do not checkpoint segments that contain MABN layers;
* a training-mode call under ``torch.no_grad()`` updates buffer_x2, running_var and the
  counter; its Psi slot keeps its previous value (there is no backward).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abnexp.norm.abn import NormActBase
from abnexp.norm.activations import get_activation
from abnexp.norm.functional import channel, compute_dtype, reduce_dims
from abnexp.norm.grouping import for_each_group, refuse_recompute

R_MAX = 5.0  # r is clamped to [1/R_MAX, R_MAX] (reference code)


class CenConv2d(nn.Conv2d):
    """Weight-centralized convolution (MABN paper Sec. 4.3): ``nn.Conv2d`` computed with
    ``W - mean(W)``, the mean taken per output filter over (C_in/groups, kh, kw), inside
    autograd. Same constructor, parameters and input/output shapes as ``nn.Conv2d``; the
    stored ``weight`` is the raw (uncentred) parameter. Used for every conv that feeds an MABN
    layer when ``norm=mabn`` (models build such convs with ``norm_act.conv``)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        return self._conv_forward(x, w - w.mean(dim=(1, 2, 3), keepdim=True), self.bias)


class _MABNFunction(torch.autograd.Function):
    """y = gamma * r * x * invstd + beta with MABN's moving-average backward (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, invstd, r, buffer_gz, slot, use_sma):
        cdt = compute_dtype(x.dtype)
        scale = (weight.to(cdt) * r * invstd) if weight is not None else r * invstd
        y = x.to(cdt) * channel(scale, x)
        if bias is not None:
            y = y + channel(bias.to(cdt), x)
        ctx.save_for_backward(x, weight, invstd, r)
        ctx.buffer_gz, ctx.slot, ctx.use_sma = buffer_gz, slot, use_sma
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, invstd, r = ctx.saved_tensors
        cdt = compute_dtype(x.dtype)
        dims = reduce_dims(x)
        dyc = dy.to(cdt)
        z = x.to(cdt) * channel(invstd, x)
        gamma = weight.to(cdt) if weight is not None else torch.ones_like(r)
        g = dyc * channel(gamma * r, x)
        gz = (g * z).mean(dims)
        ctx.buffer_gz[ctx.slot] = gz.to(ctx.buffer_gz.dtype)
        psi = ctx.buffer_gz.to(cdt).mean(0) if ctx.use_sma else gz
        dx = (g - z * channel(psi, x)) * channel(invstd, x)
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dweight = ((dyc * z).sum(dims) * r).to(weight.dtype) if need_w else None
        dbias = dyc.sum(dims).to(weight.dtype) if need_b else None  # affine: both or neither
        return dx.to(x.dtype), dweight, dbias, None, None, None, None, None


class MABN2d(NormActBase):
    """MABN + activation (``norm=mabn``); see the module docstring for the algorithm.

    Args:
        num_features, eps, affine, activation, activation_param, device, dtype: as
            :class:`~abnexp.norm.NormActBase`.
        momentum: running_var update factor of the new value (default 0.02 = the reference's
            0.98 on the old value); None = cumulative average.
        track_running_stats: must be True (r and inference need running_var).
        buffer_size: m, normalization batches in the moving averages (iterations when
            group_size=0; paper: 16 on COCO, 16/32 in the tables).
        warmup_iters: iterations that use the current batch's statistics (at least m).
        r_warmup_iters: iterations with r = 1 (reference: 1000; at least ``warmup_iters``).
        group_size: normalization batch (0 = whole batch), see :mod:`abnexp.norm.grouping`.

    Input (N, C, *) with 0-3 spatial dims, float64/32/16/bfloat16 (statistics in float32 or
    float64); output the same shape and dtype. ``running_mean`` stays 0 (MABN subtracts no
    mean); ``num_steps`` counts training calls (t), ``num_batches_tracked`` normalization
    batches (n).

    Raises:
        ValueError: bad sizes / options; wrong input rank or channels.
        RuntimeError: a training-mode forward recomputed during backward (checkpointing).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.02,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01,
                 buffer_size: int = 16, warmup_iters: int = 100, r_warmup_iters: int = 1000,
                 group_size: int = 0, device: Any = None, dtype: Any = None) -> None:
        if not track_running_stats:
            raise ValueError("MABN2d needs track_running_stats=True (r and inference use running_var)")
        if buffer_size < 1 or warmup_iters < 0 or r_warmup_iters < 0 or group_size < 0:
            raise ValueError(f"MABN2d: need buffer_size >= 1, warmup_iters >= 0, r_warmup_iters >= 0, "
                             f"group_size >= 0; got {buffer_size}, {warmup_iters}, {r_warmup_iters}, "
                             f"{group_size}")
        super().__init__(num_features, eps, momentum, affine, True, activation, activation_param,
                         device, dtype)
        self.buffer_size, self.warmup_iters = int(buffer_size), int(warmup_iters)
        self.r_warmup_iters, self.group_size = int(r_warmup_iters), int(group_size)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("buffer_x2", torch.zeros(buffer_size, num_features, **factory))
        self.register_buffer("buffer_gz", torch.zeros(buffer_size, num_features, **factory))
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        """running_var <- 1, statistic buffers <- 0, counters <- 0."""
        super().reset_running_stats()
        if hasattr(self, "num_steps"):
            self.buffer_x2.zero_()
            self.buffer_gz.zero_()
            self.num_steps.zero_()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, buffer_size={self.buffer_size}, warmup_iters="
                f"{self.warmup_iters}, r_warmup_iters={self.r_warmup_iters}, group_size={self.group_size}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training or x.shape[0] == 0:
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             False, 0.0, self.eps)
        else:
            refuse_recompute("MABN2d")
            self.num_steps.add_(1)
            y = for_each_group(self._train_iteration, self.group_size, x)
        return get_activation(self.activation).forward_(y, self.activation_param)

    def _train_iteration(self, x: Tensor) -> Tensor:
        """One training iteration on (n, C, *): statistics, buffers, then the custom Function."""
        _, factor, _, running_var = self._stats_mode()
        t, n = int(self.num_steps), int(self.num_batches_tracked)
        cdt = compute_dtype(x.dtype)
        with torch.no_grad():
            x2 = x.detach().to(cdt).square().mean(reduce_dims(x))
            slot = n % self.buffer_size
            self.buffer_x2[slot] = x2.to(self.buffer_x2.dtype)
            use_sma = not (n <= self.buffer_size or t < self.warmup_iters)
            var = self.buffer_x2.to(cdt).mean(0) if use_sma else x2
            std = (var + self.eps).sqrt()
            if t <= max(self.r_warmup_iters, self.warmup_iters):
                r = torch.ones_like(var)
            else:
                r = (std / (running_var.to(cdt) + self.eps).sqrt()).clamp_(1.0 / R_MAX, R_MAX)
            running_var.mul_(1.0 - factor).add_(var.to(running_var.dtype), alpha=factor)
        return _MABNFunction.apply(x, self.weight, self.bias, std.reciprocal(), r, self.buffer_gz,
                                   slot, use_sma)
