"""The shared math of the BN + activation strategies, as small replaceable functions.

Plain-PyTorch reference (and fallback) for the five strategies of InPlace-ABN (Rota Bulò,
Porzi, Kontschieder, CVPR 2018). The functions are split the way a native kernel module
would be (statistics / forward / backward-reduce / backward-elementwise) so that each one
can later be swapped for a C++/CUDA implementation with the same signature.

Notation (paper, Sec. 3 and supplementary Sec. 2): ``x`` the BN input of shape (N, C, *)
(any of (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W), any memory layout);
``m`` = N * prod(*) values per channel; ``mu``, ``var`` the per-channel batch mean and
*biased* variance; ``invstd = 1/sqrt(var + eps)``; ``xhat = (x - mu) * invstd``;
``y = gamma * xhat + beta``; ``z = phi(y)``.

Dtypes: statistics, per-channel vectors and all intermediate arithmetic use the *compute
dtype* -- float64 for float64 inputs, float32 otherwise (so float16/bfloat16 inputs are
upcast, as required for AMP); full-size results are returned in the input's dtype and
keep the input's memory layout. Per-channel vectors are 1-D of length C.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from abnexp.norm.activations import get_activation


# ---------------------------------------------------------------------------------------
# shapes and dtypes
# ---------------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """The dimensions reduced per channel: (0, 2, 3, ...)."""
    return (0,) + tuple(range(2, x.dim()))


def values_per_channel(x: Tensor) -> int:
    """m = N * prod(spatial sizes), the number of values of each channel."""
    return x.shape[0] * math.prod(x.shape[2:])


def channel(v: Tensor, x: Tensor) -> Tensor:
    """View a per-channel vector (C,) as (1, C, 1, ...) to broadcast against ``x``."""
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def check_batch_size(x: Tensor, layer: str = "") -> None:
    """Raise torch BatchNorm's ``ValueError`` when a channel has a single value (a batch
    variance of 0). No values (N = 0 or a zero-size spatial dim) is accepted, as
    ``torch.nn.BatchNorm2d`` accepts it.

    Args:
        layer: prefixed to the message (e.g. ``"InPlaceABN(64)"``), naming the layer.
    Raises:
        ValueError: "[layer: ]Expected more than 1 value per channel when training, got input
            size ..." (torch.nn.functional.batch_norm's text).
    """
    if values_per_channel(x) == 1:
        raise ValueError(f"{layer + ': ' if layer else ''}Expected more than 1 value per channel "
                         f"when training, got input size {x.size()}")


def affine_params(weight: Optional[Tensor], bias: Optional[Tensor], num_features: int,
                  dtype: torch.dtype, device: torch.device, eps: Optional[float] = None
                  ) -> tuple[Tensor, Tensor]:
    """(gamma, beta) as detached (C,) vectors in ``dtype``; ones/zeros when not affine.

    With ``eps`` given, gamma is the in-place layers' *effective* scale ``|weight| + eps``
    (the reference library's convention that keeps pi_{gamma,beta} invertible, see
    :func:`flip_weight_grad`); without, gamma is ``weight`` itself.
    """
    if weight is None:
        gamma = torch.ones(num_features, dtype=dtype, device=device)
    else:
        gamma = weight.detach().to(dtype)
        if eps is not None:
            gamma = gamma.abs() + eps
    beta = (torch.zeros(num_features, dtype=dtype, device=device) if bias is None
            else bias.detach().to(dtype))
    return gamma, beta


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------
def batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance (paper Eq. 1), in the compute dtype.

    Returns:
        (mean, var), each of shape (C,); NaN for an input without values (as ``torch.var_mean``,
        without its warning).
    """
    if values_per_channel(x) == 0:
        nan = torch.full((x.shape[1],), float("nan"), dtype=compute_dtype(x.dtype), device=x.device)
        return nan, nan.clone()
    xc = x.to(compute_dtype(x.dtype))
    var, mean = torch.var_mean(xc, dim=reduce_dims(x), correction=0)
    return mean, var


def inverse_std(var: Tensor, eps: float) -> Tensor:
    """invstd = 1 / sqrt(var + eps), a new (C,) tensor in ``var``'s dtype."""
    return torch.rsqrt(var + eps)


@torch.no_grad()
def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor,
                         var: Tensor, count: int, factor: float) -> None:
    """In place: ``r <- (1 - factor) r + factor * s`` as torch.nn.BatchNorm does.

    The running variance receives the *unbiased* batch variance ``var * m / (m - 1)``;
    ``factor`` is ``momentum`` or, for ``momentum=None``, ``1 / num_batches_tracked``
    (cumulative average). ``count == 0`` (an empty batch) leaves both unchanged, as
    ``torch.nn.BatchNorm2d`` does.
    """
    if count == 0:
        return
    unbiased = var * (count / max(count - 1, 1))
    running_mean.mul_(1.0 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
    running_var.mul_(1.0 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


def merge_statistics(mean: Tensor, var: Tensor, count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics of the union of W workers' batches (Chan et al.'s parallel formula).

    Args:
        mean, var: (W, C) per-worker means and *biased* variances; count: (W,) values per
            channel of each worker (unequal counts allowed; workers with count 0 are ignored).
    Returns:
        (mean, var, count): (C,), (C,) and a 0-dim total, in ``mean``'s dtype (computed in
        float64): mean = sum n_w mean_w / n, var = sum n_w (var_w + (mean_w - mean)^2) / n.
    """
    n = count.double().unsqueeze(1)
    present = n > 0
    m = torch.where(present, mean.double(), 0.0)
    v = torch.where(present, var.double(), 0.0)
    total = n.sum(0)
    merged = (m * n).sum(0) / total
    dev = torch.where(present, m - merged, 0.0)
    merged_var = (n * (v + dev * dev)).sum(0) / total
    return merged.to(mean.dtype), merged_var.to(mean.dtype), total.squeeze(0).to(mean.dtype)


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------
def forward(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor,
            activation: str, param: float, out: Optional[Tensor] = None) -> Tensor:
    """z = phi(gamma * (x - mean) * invstd + beta)  (paper Eq. 2 followed by phi).

    Args:
        x: input (N, C, *), any floating dtype and layout.
        mean, invstd, gamma, beta: (C,) vectors (compute dtype).
        out: if given (it must be ``x``), the result is written into ``x``'s storage
            (Algorithm 1). Half-precision inputs are processed in float32 and copied back.

    Returns:
        z with ``x``'s shape, dtype and memory layout (``out`` itself when given).
    """
    act = get_activation(activation)
    cdt = compute_dtype(x.dtype)
    m, s, b = channel(mean.to(cdt), x), channel((invstd * gamma).to(cdt), x), channel(beta.to(cdt), x)
    if out is not None and x.dtype == cdt:
        return act.forward_(out.sub_(m).mul_(s).add_(b), param)
    y = act.forward_(x.sub(m).mul_(s).add_(b), param)  # new tensor in cdt, x's layout
    if out is not None:
        return out.copy_(y)
    return y.to(x.dtype)


def normalize(x: Tensor, mean: Tensor, invstd: Tensor, dtype: Optional[torch.dtype] = None
              ) -> Tensor:
    """xhat = (x - mean) * invstd, a new tensor in ``dtype`` (default: ``x``'s dtype)."""
    cdt = compute_dtype(x.dtype)
    xhat = x.sub(channel(mean.to(cdt), x)).mul_(channel(invstd.to(cdt), x))
    return xhat.to(x.dtype if dtype is None else dtype)


def affine_activation(xhat: Tensor, gamma: Tensor, beta: Tensor, activation: str,
                      param: float, dtype: Optional[torch.dtype] = None) -> Tensor:
    """z = phi(gamma * xhat + beta) as a new tensor in ``dtype`` (default: xhat's dtype)."""
    cdt = compute_dtype(xhat.dtype)
    y = torch.addcmul(channel(beta.to(cdt), xhat), xhat, channel(gamma.to(cdt), xhat))
    z = get_activation(activation).forward_(y, param)
    return z.to(xhat.dtype if dtype is None else dtype)


# ---------------------------------------------------------------------------------------
# backward: reductions
# ---------------------------------------------------------------------------------------
def backward_reduce(dy: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (sum dL/dy, sum dL/dy * t) over N and space, t = xhat or y."""
    dims = reduce_dims(dy)
    return dy.sum(dims), (dy * t).sum(dims)


def inplace_backward_reduce(z: Tensor, dz: Tensor, gamma: Tensor, beta: Tensor,
                            activation: str, param: float, variant: str
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First half of Algorithm 2: recover dL/dy and xhat (variant I) or y (variant II).

    dL/dy = phi_backward(z, dL/dz); y = phi^-1(z); variant I also inverts pi:
    xhat = (y - beta) / gamma (gamma = effective scale |weight| + eps).

    Args:
        z: saved output (N, C, *), any dtype; dz: dL/dz, same shape (may be expanded, it
            is only read).
    Returns:
        (dy, t, sum_dy, sum_dy_t): new full-size tensors dy and t (t = xhat for "I",
        y for "II") in the compute dtype, and the (C,) reductions of :func:`backward_reduce`.
    """
    act = get_activation(activation)
    if act.inverse is None:
        raise ValueError(f"activation {activation!r} is not invertible")
    cdt = compute_dtype(z.dtype)
    zc, dzc = z.to(cdt), dz.to(cdt)
    dy = act.backward(zc, dzc, param)
    t = act.inverse(zc, param)                 # y, a new tensor
    if variant == "I":
        t.sub_(channel(beta.to(cdt), t)).div_(channel(gamma.to(cdt), t))   # xhat
    elif variant != "II":
        raise ValueError(f"unknown in-place variant {variant!r}; valid: 'I', 'II'")
    sum_dy, sum_dy_t = backward_reduce(dy, t)
    return dy, t, sum_dy, sum_dy_t


def checkpoint_backward_reduce(xhat: Tensor, dz: Tensor, gamma: Tensor, beta: Tensor,
                               activation: str, param: float
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """Checkpointing: recompute z = phi(pi(xhat)) (paper Fig. 2b/2c), then dL/dy and sums.

    Args:
        xhat: normalized input (N, C, *), compute dtype; dz: dL/dz (only read).
    Returns:
        (dy, sum_dy, sum_dy_xhat): dy a new full-size tensor (compute dtype), sums (C,).
    """
    cdt = xhat.dtype
    z = affine_activation(xhat, gamma, beta, activation, param)
    dy = get_activation(activation).backward(z, dz.to(cdt), param)
    del z
    sum_dy, sum_dy_xhat = backward_reduce(dy, xhat)
    return dy, sum_dy, sum_dy_xhat


# ---------------------------------------------------------------------------------------
# backward: elementwise dL/dx and parameter gradients
# ---------------------------------------------------------------------------------------
def grad_input_xhat(dy: Tensor, xhat: Tensor, invstd: Tensor, gamma: Tensor,
                    sum_dy: Tensor, sum_dy_xhat: Tensor, count: int, batch_stats: bool,
                    dtype: torch.dtype) -> Tensor:
    """dL/dx from xhat (InPlace-ABN supplementary, dL/dx_i for variant I / standard BN):

    dL/dx = gamma * invstd * (dL/dy - (1/m) dL/dgamma * xhat - (1/m) dL/dbeta),
    with dL/dgamma = sum dL/dy*xhat, dL/dbeta = sum dL/dy. With running statistics
    (``batch_stats=False``; mean/var are constants) dL/dx = gamma * invstd * dL/dy.
    ``dy`` (our own buffer) is overwritten and returned, cast to ``dtype``.
    """
    scale = channel(gamma.to(dy.dtype) * invstd.to(dy.dtype), dy)
    if batch_stats:
        dy.addcmul_(xhat, channel(sum_dy_xhat / -count, dy)).sub_(channel(sum_dy / count, dy))
    return dy.mul_(scale).to(dtype)


def grad_input_y(dy: Tensor, y: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor,
                 sum_dy: Tensor, sum_dy_y: Tensor, count: int, batch_stats: bool,
                 dtype: torch.dtype) -> Tensor:
    """dL/dx from y (InPlace-ABN supplementary, dL/dx for variant II):

    dL/dx = [dL/dy - 1/(gamma m) dL/dgamma * y - (1/m)(dL/dbeta - beta/gamma dL/dgamma)]
            * gamma * invstd,
    with dL/dgamma from :func:`grad_gamma_y`. Note the sign of the beta term: substituting
    xhat = (y - beta)/gamma into the variant-I expression gives ``- beta/gamma``; the
    supplementary's last line prints ``+`` (a typo; float64 gradcheck confirms ``-``).
    With running statistics
    dL/dx = gamma * invstd * dL/dy. ``dy`` is overwritten and returned, cast to ``dtype``.
    """
    scale = channel(gamma.to(dy.dtype) * invstd.to(dy.dtype), dy)
    if batch_stats:
        dgamma = grad_gamma_y(sum_dy, sum_dy_y, gamma, beta)
        dy.addcmul_(y, channel(dgamma / (-count * gamma), dy))
        dy.sub_(channel((sum_dy - beta * dgamma / gamma) / count, dy))
    return dy.mul_(scale).to(dtype)


def linear_backward_reduce(x: Tensor, dz: Tensor, z: Optional[Tensor], activation: str,
                           param: float) -> tuple[Tensor, Tensor]:
    """(sum dL/dy, sum dL/dy * x) per channel, dL/dy = phi_backward(z, dL/dz) (z None: the
    identity, dL/dy = dL/dz); (C,) in the compute dtype. The reference of the native
    ``linear_backward_reduce`` (MABN's and CBN's backward; dz = x gives sum x and sum x^2)."""
    cdt = compute_dtype(x.dtype)
    dy = dz.to(cdt) if z is None else get_activation(activation).backward(z.to(cdt), dz.to(cdt), param)
    return backward_reduce(dy, x.to(cdt))


def linear_grad_input(x: Tensor, dz: Tensor, z: Optional[Tensor], a: Tensor, b: Tensor, c: Tensor,
                      activation: str, param: float) -> Tensor:
    """dL/dx = a * dL/dy + b * x + c with (C,) coefficients, dL/dy as in
    :func:`linear_backward_reduce`; a new tensor in x's dtype. The reference of the native
    ``linear_backward_elementwise``."""
    cdt = compute_dtype(x.dtype)
    dy = dz.to(cdt) if z is None else get_activation(activation).backward(z.to(cdt), dz.to(cdt), param)
    dx = dy * channel(a.to(cdt), x) + x.to(cdt) * channel(b.to(cdt), x) + channel(c.to(cdt), x)
    return dx.to(x.dtype)


def grad_gamma_y(sum_dy: Tensor, sum_dy_y: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """dL/dgamma = (1/gamma) (sum dL/dy*y - beta * dL/dbeta)  (supplementary, variant II)."""
    return (sum_dy_y - beta * sum_dy) / gamma


def flip_weight_grad(grad_gamma: Tensor, weight: Tensor) -> Tensor:
    """dL/dweight from dL/d(|weight| + eps): negated where weight < 0.

    At weight == 0 the right derivative (+1) is used, as in the reference library, so a
    zero-initialised weight still receives a gradient.
    """
    return torch.where(weight.detach() < 0, -grad_gamma, grad_gamma).to(weight.dtype)
