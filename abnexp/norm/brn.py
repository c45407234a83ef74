"""Batch Renormalization + activation (``norm=brn``), the small-batch baseline of MABN and CBN.

Source: Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models" (NIPS 2017), Algorithm 1; schedule of its §4 (r_max = 1, d_max = 0 for
the first 5k iterations, then linearly to r_max = 3 at 40k and d_max = 5 at 25k).

Training, per channel over N and the spatial positions: ``mu_B``, ``sigma_B = sqrt(var_B +
eps)`` (biased batch variance), ``sigma = sqrt(running_var + eps)``;
``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - running_mean) / sigma,
-d_max, d_max)``, both without gradient; ``xhat = (x - mu_B) / sigma_B * r + d``;
``y = gamma * xhat + beta``; then the activation. Running statistics are updated as torch's
BatchNorm does (momentum, unbiased variance) *after* r and d are computed; inference is
BatchNorm with running statistics. With r_max = 1 and d_max = 0 this is exactly BatchNorm.
The schedule counts training iterations (``num_steps``: non-empty training-mode calls, one per
optimizer step in the usual loop); with ``group_size`` the running statistics advance once per
group (``num_batches_tracked``), see :mod:`abnexp.norm.grouping`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from abnexp.norm.base import NormActBase
from abnexp.norm.activations import activate
from abnexp.norm.functional import (check_batch_size, compute_dtype, reduce_dims, update_running_stats,
                                    values_per_channel)
from abnexp.norm.grouping import affine_normalize, for_each_group


def renorm_limits(t, r_max: float, d_max: float, start_iters: int, r_max_iters: int,
                  d_max_iters: int):
    """(r_max, d_max) at training iteration ``t``: (1, 0) up to ``start_iters``, then linear
    ramps reaching ``r_max`` at ``r_max_iters`` and ``d_max`` at ``d_max_iters`` (constant after).

    A ramp whose end is not after ``start_iters`` jumps to its final value at ``start_iters``.
    ``t`` an int gives floats; a 0-dim floating tensor (the layer's ``num_steps`` in float64)
    gives 0-dim tensors of its dtype on its device, computed there (no host read).
    """
    def ramp(end: int):
        if end <= start_iters:
            return (t > start_iters) * 1.0
        frac = (t - start_iters) / (end - start_iters)
        return frac.clamp(0.0, 1.0) if isinstance(frac, Tensor) else min(max(frac, 0.0), 1.0)

    return 1.0 + (r_max - 1.0) * ramp(r_max_iters), d_max * ramp(d_max_iters)


class BatchRenorm2d(NormActBase):
    """Batch Renormalization + activation; see the module docstring for the algorithm.

    Args:
        num_features, eps, momentum, affine, activation, activation_param, device, dtype: as
            :class:`~abnexp.norm.NormActBase` (torch BatchNorm semantics).
        track_running_stats: must be True (r and d need the running statistics).
        r_max, d_max: final clipping limits (>= 1 and >= 0).
        renorm_start_iters, r_max_iters, d_max_iters: the schedule (iterations).
        group_size: normalization batch (0 = whole batch), see :mod:`abnexp.norm.grouping`.

    Input (N, C, *) with 0-3 spatial dims, any floating dtype; output the same shape and dtype.
    An empty input (N = 0 or a zero-size spatial dim) gives an empty output and leaves the running
    statistics and both counters untouched (the schedule does not advance); weight and bias get
    zero gradients. The schedule is computed on the device from ``num_steps`` (no host read).
    ``held_for_backward``: the last training call's r and d per group (see
    :meth:`~abnexp.norm.NormActBase.hold_for_backward`; what makes ``torch.compile`` exact).

    Raises:
        ValueError: bad options; wrong input rank or channels; one value per channel in training.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01,
                 r_max: float = 3.0, d_max: float = 5.0, renorm_start_iters: int = 5000,
                 r_max_iters: int = 40000, d_max_iters: int = 25000, group_size: int = 0,
                 device: Any = None, dtype: Any = None) -> None:
        if not track_running_stats:
            raise ValueError("BatchRenorm2d needs track_running_stats=True (r and d use the "
                             "running statistics)")
        if r_max < 1 or d_max < 0 or min(renorm_start_iters, r_max_iters, d_max_iters, group_size) < 0:
            raise ValueError(f"BatchRenorm2d: need r_max >= 1, d_max >= 0 and non-negative iteration "
                             f"counts and group_size; got r_max={r_max}, d_max={d_max}, "
                             f"renorm_start_iters={renorm_start_iters}, r_max_iters={r_max_iters}, "
                             f"d_max_iters={d_max_iters}, group_size={group_size}")
        super().__init__(num_features, eps, momentum, affine, True, activation, activation_param,
                         device, dtype)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.renorm_start_iters, self.r_max_iters = int(renorm_start_iters), int(r_max_iters)
        self.d_max_iters, self.group_size = int(d_max_iters), int(group_size)
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        """BatchNorm's initial running statistics; the schedule restarts."""
        super().reset_running_stats()
        if hasattr(self, "num_steps"):
            self.num_steps.zero_()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, schedule=("
                f"{self.renorm_start_iters}, {self.r_max_iters}, {self.d_max_iters}), "
                f"group_size={self.group_size}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training or x.numel() == 0:  # an empty batch: buffers and counters untouched
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             False, 0.0, self.eps)
        else:
            t = self.advance(self.num_steps)
            self.held_for_backward = []
            y = for_each_group(lambda group: self._train_iteration(group, t), self.group_size, x)
        return activate(self.activation, y, self.activation_param)

    def _train_iteration(self, x: Tensor, t: Tensor) -> Tensor:
        check_batch_size(x, self.layer_name())
        _, factor, running_mean, running_var = self._stats_mode()
        cdt = compute_dtype(x.dtype)
        r_lim, d_lim = (lim.to(cdt) for lim in renorm_limits(t.double(), self.r_max, self.d_max,
                                                             self.renorm_start_iters, self.r_max_iters,
                                                             self.d_max_iters))
        xc = x.to(cdt)
        var, mean = torch.var_mean(xc, dim=reduce_dims(x), correction=0)
        std = (var + self.eps).sqrt()
        with torch.no_grad():
            sigma = (running_var.to(cdt) + self.eps).sqrt()
            r = torch.clamp((std.detach() / sigma), r_lim.reciprocal(), r_lim)
            d = torch.clamp((mean.detach() - running_mean.to(cdt)) / sigma, -d_lim, d_lim)
            self.hold_for_backward(r, d)  # read from the running statistics updated below
            update_running_stats(running_mean, running_var, mean.detach(), var.detach(),
                                 values_per_channel(x), factor)
        # gamma * ((x - mu_B) / sigma_B * r + d) + beta = gamma * (x - (mu_B - d sigma_B / r)) * (r / sigma_B) + beta
        return affine_normalize(xc, mean - d * std / r, r / std, self.weight, self.bias).to(x.dtype)
