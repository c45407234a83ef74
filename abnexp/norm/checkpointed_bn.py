"""CheckpointedABN: BN + activation that recomputes in backward instead of keeping z.

Two strategies of InPlace-ABN (Rota Bulò et al., CVPR 2018, Sec. 3 / Fig. 2b-c):

* ``variant="baseline"`` (norm=checkpoint): keeps x, mu_B and sigma_B; backward recomputes
  BN_{gamma,beta} (xhat = (x - mu_B)/sigma_B, y = gamma*xhat + beta) and z = phi(y).
* ``variant="proposed"`` (norm=checkpoint_proposed): keeps the normalized input xhat (one
  full-size buffer, the input of pi_{gamma,beta}) and sigma_B only; backward recomputes just
  pi_{gamma,beta} and phi and uses the xhat-form gradient, which needs neither x nor mu_B.
  (Recomputing "only pi and phi" needs pi's input xhat; keeping x instead would also
  require mu_B and the normalization -- that is the baseline.)

Neither keeps z: as a drop-in layer the memory saving materialises only where nothing
else keeps z (a following convolution does keep its input z).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from abnexp.norm import functional as Fn
from abnexp.norm import backends, native
from abnexp.norm.base import NormActBase
from abnexp.norm.activations import check_output_form, output_to_keep

VARIANTS = ("baseline", "proposed")
STANDARD = "standard"  # internal: ABN on the native path (keeps x and z, xhat-form backward)


def no_autocast(device_type: str):
    """Disable autocast inside the custom functions (they cast explicitly)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def batch_or_running_stats(x: Tensor, running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], batch_stats: bool, factor: float,
                           eps: float, use_native: bool = False) -> tuple[Tensor, Tensor]:
    """(mean, invstd) as new (C,) compute-dtype tensors; updates the running stats when
    ``batch_stats`` and they are given (batch statistics from the native ``statistics``
    operator when ``use_native``). Raises the torch ValueError for m == 1."""
    cdt = Fn.compute_dtype(x.dtype)
    if batch_stats:
        Fn.check_batch_size(x)
        mean, var = backends.ops(x).statistics(x)[:2] if use_native else Fn.batch_statistics(x)
        if running_mean is not None and running_var is not None:
            Fn.update_running_stats(running_mean, running_var, mean, var,
                                    Fn.values_per_channel(x), factor)
    else:
        mean, var = running_mean.to(cdt, copy=True), running_var.to(cdt)
    return mean, Fn.inverse_std(var, eps)


class _CheckpointedABNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                batch_stats: bool, factor: float, eps: float, activation: str, param: float,
                variant: str, use_native: bool) -> Tensor:
        with no_autocast(x.device.type):
            mean, invstd = batch_or_running_stats(x, running_mean, running_var, batch_stats,
                                                  factor, eps, use_native)
            gamma, beta = Fn.affine_params(weight, bias, x.shape[1], mean.dtype, x.device)
            if variant != "proposed":
                z = (backends.ops(x).forward(x, mean, invstd, gamma, beta, activation, param)
                     if use_native else Fn.forward(x, mean, invstd, gamma, beta, activation, param))
                kept_z = (output_to_keep(activation, z),) if variant == STANDARD else ()
                ctx.save_for_backward(x, mean, invstd, weight, bias, *kept_z)
            else:
                if use_native:
                    zero, one = torch.zeros_like(mean), torch.ones_like(mean)
                    xhat = backends.ops(x).forward(x, mean, invstd, one, zero, "identity", 0.0)
                    z = backends.ops(xhat).forward(xhat, zero, one, gamma, beta, activation, param)
                else:
                    xhat = Fn.normalize(x, mean, invstd)
                    z = Fn.affine_activation(xhat, gamma, beta, activation, param)
                ctx.save_for_backward(xhat, invstd, weight, bias)
        ctx.cfg = (batch_stats, activation, param, variant, x.dtype, use_native)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dz: Tensor):
        refs = 0 if torch.compiler.is_compiling() else sys.getrefcount(dz)  # see native.grad_writable
        batch_stats, activation, param, variant, dtype, use_native = ctx.cfg
        if use_native:
            return _native_backward(ctx, dz, refs)
        with no_autocast(dz.device.type):
            if variant != "proposed":  # baseline (and STANDARD, which also keeps z)
                x, mean, invstd, weight, bias = ctx.saved_tensors[:5]
                xhat = Fn.normalize(x, mean, invstd, dtype=invstd.dtype)   # recompute BN
            else:
                xhat, invstd, weight, bias = ctx.saved_tensors
                xhat = xhat.to(invstd.dtype)
            gamma, beta = Fn.affine_params(weight, bias, xhat.shape[1], invstd.dtype,
                                           xhat.device)
            dy, sum_dy, sum_dy_xhat = Fn.checkpoint_backward_reduce(xhat, dz, gamma, beta,
                                                                    activation, param)
            dx = None
            if ctx.needs_input_grad[0]:
                dx = Fn.grad_input_xhat(dy, xhat, invstd, gamma, sum_dy, sum_dy_xhat,
                                        Fn.values_per_channel(xhat), batch_stats, dtype)
            dw = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
            db = sum_dy.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None, None, None, None


def _native_backward(ctx: Any, dz: Tensor, refs: int):
    """Backward of :class:`_CheckpointedABNFunction` with the native xhat-form operators."""
    batch_stats, activation, param, variant, dtype, _ = ctx.cfg
    z = mean = None
    if variant == "proposed":
        x, invstd, weight, bias = ctx.saved_tensors
    elif variant == STANDARD:
        x, mean, invstd, weight, bias, z = ctx.saved_tensors
    else:
        x, mean, invstd, weight, bias = ctx.saved_tensors
    return native_xhat_backward(ctx, dz, refs, x, z, mean, invstd, weight, bias, activation, param,
                                batch_stats) + (None,) * 9


def native_xhat_backward(ctx: Any, dz: Tensor, refs: int, x: Tensor, z: Optional[Tensor],
                         mean: Optional[Tensor], invstd: Tensor, weight: Optional[Tensor],
                         bias: Optional[Tensor], activation: str, param: float, batch_stats: bool,
                         count: Optional[int] = None, group_sums: Optional[Callable] = None) -> tuple:
    """The native xhat-form backward: x (or the kept xhat, then ``mean`` is None) and dL/dz are
    read twice, nothing full-size is kept besides dL/dx (written into dL/dz when that buffer is
    exclusively ours). ``z``: the kept output, if any. The synchronized layer passes
    ``group_sums`` (the sums over its process group) and the group's ``count`` for dL/dx;
    dL/dweight and dL/dbias use the local sums. Returns (dL/dx, dL/dweight, dL/dbias)."""
    ops = backends.ops(dz)
    with no_autocast(dz.device.type):
        gamma, beta = Fn.affine_params(weight, bias, x.shape[1], invstd.dtype, x.device)
        norm = invstd if mean is not None else None
        sum_dy, sum_dy_xhat = ops.xhat_backward_reduce(x, dz, z, mean, norm, gamma, beta,
                                                       activation, param)
        all_dy, all_dy_xhat = group_sums(sum_dy, sum_dy_xhat) if group_sums else (sum_dy, sum_dy_xhat)
        dx = None
        if ctx.needs_input_grad[0]:
            args = (z, mean, invstd, gamma, beta, all_dy, all_dy_xhat,
                    Fn.values_per_channel(x) if count is None else count, batch_stats, activation, param)
            if native.grad_writable(dz, refs):
                ops.xhat_backward_elementwise_(x, dz, *args)
                dx = dz
            else:
                dx = ops.xhat_backward_elementwise(x, dz, *args)
        dw = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = sum_dy.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
    return dx, dw, db


def checkpointed_abn(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                     activation: str = "leaky_relu", activation_param: float = 0.01,
                     variant: str = "baseline") -> Tensor:
    """Functional checkpointed BN + activation (arguments as ``F.batch_norm``).

    ``training``: use (and, if running tensors are given, update with factor ``momentum``)
    batch statistics; otherwise normalize with the running statistics. Returns a new
    tensor like ``x``; shapes/dtypes as :class:`CheckpointedABN`.
    """
    if variant not in VARIANTS + (STANDARD,):
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return _CheckpointedABNFunction.apply(x, weight, bias, running_mean, running_var,
                                          bool(training), float(momentum), float(eps),
                                          activation, float(activation_param), variant,
                                          backends.enabled(x, activation, activation_param))


class CheckpointedABN(NormActBase):
    """BN + activation with checkpointing (paper Fig. 2b ``baseline`` / 2c ``proposed``).

    Same constructor as :class:`~abnexp.norm.abn.ABN` plus ``variant``; computes exactly
    BN_{gamma,beta} followed by phi (gamma is used as is; any sign). Kept for backward per
    layer: ``baseline`` -> x (the input tensor itself) + (C,) mu_B, 1/sigma_B;
    ``proposed`` -> xhat (new buffer, x's size and dtype) + (C,) 1/sigma_B.

    Input/output: (N, C, *) with 0-3 spatial dims, float64/32/16 or bfloat16 (statistics
    and arithmetic in float32 for half inputs, output in the input dtype), contiguous or
    channels_last (kept). Gradients: xhat form of the supplementary's dL/dx.

    An empty input (N = 0 or a zero-size spatial dim) gives an empty output, untouched
    statistics and zero gradients for weight and bias (see :class:`~abnexp.norm.NormActBase`).
    Under AMP the proposed variant keeps xhat in the input's half dtype, which bounds the
    precision of its gradients (results/amp_precision.md); the baseline keeps x as BatchNorm does.

    Raises:
        ValueError: unknown variant/activation; negative leaky_relu slope or elu alpha
            (dL/dy is computed from the recomputed z); wrong input rank/channels; one value
            per channel when using batch statistics (naming the layer and the shape).
    """

    inplace = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01,
                 variant: str = "baseline", device: Any = None, dtype: Any = None) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
        check_output_form(activation, activation_param, "CheckpointedABN")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation,
                         activation_param, device=device, dtype=dtype)
        self.variant = variant

    def extra_repr(self) -> str:
        return super().extra_repr() + f", variant={self.variant}"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        batch_stats, factor, running_mean, running_var = self._stats_mode()
        return checkpointed_abn(x, self.weight, self.bias, running_mean, running_var,
                                batch_stats, factor, self.eps, self.activation,
                                self.activation_param, self.variant)
