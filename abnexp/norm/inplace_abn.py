"""InPlaceABN: BN + invertible activation computed in place (InPlace-ABN I and II).

Rota Bulò, Porzi, Kontschieder, "In-Place Activated BatchNorm for Memory-Optimized Training
of DNNs", CVPR 2018: Algorithm 1 (forward: z = phi(BN(x)) written into x's storage; keep
only z and sigma_B) and Algorithm 2 (backward: dL/dy = phi_backward(z, dL/dz), y = phi^-1(z);
variant I also inverts pi, xhat = (y - beta)/gamma, and uses the xhat-form gradients;
variant II uses the y-form gradients of the supplementary, Sec. 2).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from abnexp.norm import functional as Fn
from abnexp.norm import backends, native
from abnexp.norm.base import NormActBase, batchnorm_affine
from abnexp.norm.activations import check_invertible
from abnexp.norm.checkpointed_bn import batch_or_running_stats, no_autocast

VARIANTS = ("I", "II")


class _InPlaceABNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                batch_stats: bool, factor: float, eps: float, activation: str, param: float,
                variant: str, use_native: bool) -> Tensor:
        with no_autocast(x.device.type):
            mean, invstd = batch_or_running_stats(x, running_mean, running_var, batch_stats,
                                                  factor, eps, use_native)
            gamma, beta = Fn.affine_params(weight, bias, x.shape[1], mean.dtype, x.device,
                                           eps=eps)
            if use_native:
                backends.ops(x).forward_(x, mean, invstd, gamma, beta, activation, param)
                z = x
            else:
                z = Fn.forward(x, mean, invstd, gamma, beta, activation, param, out=x)
        ctx.mark_dirty(z)
        ctx.save_for_backward(z, invstd, weight, bias)
        ctx.cfg = (batch_stats, eps, activation, param, variant, use_native)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dz: Tensor):
        refs = 0 if torch.compiler.is_compiling() else sys.getrefcount(dz)  # see native.grad_writable
        batch_stats, eps, activation, param, variant, use_native = ctx.cfg
        if use_native:
            return native_backward(ctx, dz, refs, eps, activation, param, variant, batch_stats) + (None,) * 9
        z, invstd, weight, bias = ctx.saved_tensors
        with no_autocast(dz.device.type):
            gamma, beta = Fn.affine_params(weight, bias, z.shape[1], invstd.dtype, z.device,
                                           eps=eps)
            dy, t, sum_dy, sum_dy_t = Fn.inplace_backward_reduce(z, dz, gamma, beta,
                                                                 activation, param, variant)
            dgamma = sum_dy_t if variant == "I" else Fn.grad_gamma_y(sum_dy, sum_dy_t,
                                                                      gamma, beta)
            dx = None
            if ctx.needs_input_grad[0]:
                count = Fn.values_per_channel(z)
                if variant == "I":
                    dx = Fn.grad_input_xhat(dy, t, invstd, gamma, sum_dy, sum_dy_t, count,
                                            batch_stats, z.dtype)
                else:
                    dx = Fn.grad_input_y(dy, t, invstd, gamma, beta, sum_dy, sum_dy_t, count,
                                         batch_stats, z.dtype)
            dw = (Fn.flip_weight_grad(dgamma, weight)
                  if weight is not None and ctx.needs_input_grad[1] else None)
            db = sum_dy.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None, None, None, None


def native_backward(ctx: Any, dz: Tensor, refs: int, eps: float, activation: str, param: float,
                    variant: str, batch_stats: bool, count: Optional[int] = None,
                    group_sums: Optional[Callable] = None) -> tuple:
    """Algorithm 2 with the native operators: one pass over (z, dL/dz) for the sums, one for
    dL/dx (written into dL/dz when that buffer is exclusively ours); dL/dy and xhat / y are
    recomputed per element instead of being materialised. ``ctx.saved_tensors`` is
    (z, invstd, weight, bias). The synchronized layer passes ``group_sums`` (the sums over its
    process group) and the group's ``count`` for dL/dx; dL/dweight and dL/dbias use the local
    sums. Returns (dL/dx, dL/dweight, dL/dbias)."""
    z, invstd, weight, bias = ctx.saved_tensors
    ops = backends.ops(dz)
    with no_autocast(dz.device.type):
        gamma, beta = Fn.affine_params(weight, bias, z.shape[1], invstd.dtype, z.device, eps=eps)
        sum_dy, sum_dy_t = ops.inplace_backward_reduce(z, dz, gamma, beta, activation, param,
                                                       variant)
        all_dy, all_dy_t = group_sums(sum_dy, sum_dy_t) if group_sums else (sum_dy, sum_dy_t)
        dgamma = sum_dy_t if variant == "I" else Fn.grad_gamma_y(sum_dy, sum_dy_t, gamma, beta)
        dx = None
        if ctx.needs_input_grad[0]:
            args = (invstd, gamma, beta, all_dy, all_dy_t, Fn.values_per_channel(z) if count is None else count,
                    batch_stats, activation, param, variant)
            if native.grad_writable(dz, refs):
                ops.inplace_backward_elementwise_(z, dz, *args)
                dx = dz
            else:
                dx = ops.inplace_backward_elementwise(z, dz, *args)
        dw = (Fn.flip_weight_grad(dgamma, weight)
              if weight is not None and ctx.needs_input_grad[1] else None)
        db = sum_dy.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
    return dx, dw, db


def inplace_abn(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                activation: str = "leaky_relu", activation_param: float = 0.01,
                variant: str = "I") -> Tensor:
    """Functional InPlace-ABN; **overwrites x** and returns it (arguments as F.batch_norm).

    ``training``: use (and, if running tensors are given, update with factor ``momentum``)
    batch statistics; otherwise use the running statistics. The effective scale is
    ``|weight| + eps`` (see :class:`InPlaceABN`).

    Raises:
        RuntimeError: (from autograd) ``x`` is a leaf requiring grad, or a tensor another
            op saved for its backward (then at ``backward()``: "one of the variables needed
            for gradient computation has been modified by an inplace operation").
        ValueError: unknown variant, non-invertible activation, one value per channel
            with batch statistics.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    check_invertible(activation, activation_param)
    return _InPlaceABNFunction.apply(x, weight, bias, running_mean, running_var,
                                     bool(training), float(momentum), float(eps), activation,
                                     float(activation_param), variant,
                                     backends.enabled(x, activation, activation_param))


class InPlaceABN(NormActBase):
    """BN + invertible activation written into the input's storage (paper Fig. 2d / 2e).

    ``variant="I"`` (norm=inplace_abn): backward inverts phi then pi_{gamma,beta} and uses
    the xhat-form gradients (supplementary, dL/dx for variant I). ``variant="II"``
    (norm=inplace_abn_ii): inverts phi only and uses the y-form gradients (supplementary,
    dL/dgamma and dL/dx for variant II). Kept for backward: z (the output, which *is* the
    input's storage) and the (C,) vector 1/sigma_B -- nothing else full-size.

    Computes z = phi((|weight| + eps) * xhat + bias): the effective scale ``|weight| + eps``
    (reference-library convention; ``eps`` is the layer's eps) keeps pi invertible for any
    weight. For weight > 0 this differs from BatchNorm with scale ``weight`` by
    ``eps * xhat``; dL/dweight is dL/d(scale) negated where weight < 0 (right derivative at
    0), so gradients are those of the actual parameter. Negative weights therefore act like
    their absolute value: see :func:`abnexp.norm.convert` for loading BN weights.

    Input: (N, C, *) with 0-3 spatial dims, float64/32/16 or bfloat16 (statistics and
    arithmetic in float32 for half inputs, result written in the input dtype), contiguous
    or channels_last (kept, the output is the input). Eval mode uses the running
    statistics (still in place, with a correct backward); track_running_stats=False uses
    batch statistics in eval too. The input must not be needed by anything else: clone a
    residual shortcut first (``inplace = True`` tells models to do so).

    Edge cases: an empty input (N = 0 or a zero-size spatial dim) is returned as is (empty)
    with the statistics untouched and zero gradients for weight and bias, where the reference
    library raises (see :class:`~abnexp.norm.NormActBase`); under AMP the kept z is in the
    input's half dtype, which bounds the precision of dL/dgamma (results/amp_precision.md).

    Raises:
        ValueError: activation not invertible (relu, leaky_relu with slope <= 0, elu with
            alpha <= 0) at construction; unknown variant; wrong input rank/channels; one
            value per channel when using batch statistics (naming the layer and the shape).
        RuntimeError: (autograd) the input is a leaf requiring grad or is needed by
            another op's backward.
    """

    inplace = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01,
                 variant: str = "I", device: Any = None, dtype: Any = None) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
        check_invertible(activation, activation_param, "InPlaceABN")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation,
                         activation_param, device=device, dtype=dtype)
        self.variant = variant

    def extra_repr(self) -> str:
        return super().extra_repr() + f", variant={self.variant}"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        batch_stats, factor, running_mean, running_var = self._stats_mode()
        return inplace_abn(x, self.weight, self.bias, running_mean, running_var, batch_stats,
                           factor, self.eps, self.activation, self.activation_param,
                           self.variant)

    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """As :meth:`NormActBase.inference_affine` with the effective scale ``gamma = |weight| + eps``
        (InPlace-ABN §3.2, the reference library's convention); (C,) float64 (scale, shift).

        Raises:
            ValueError: track_running_stats=False.
        """
        if self.running_var is None:
            return super().inference_affine()  # raises
        gamma, beta = Fn.affine_params(self.weight, self.bias, self.num_features, torch.float64,
                                       self.running_var.device, eps=self.eps)
        return batchnorm_affine(gamma, beta, self.running_mean, self.running_var, self.eps)
