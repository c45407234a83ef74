"""The Triton backend: ``torch.ops.abnexp_triton.<op>``, a drop-in for every ``torch.ops.abnexp``
operator (kernels/ops.cpp: same schemas, argument checks, layouts, dtypes and results).

Each operator is a :func:`torch.library.triton_op` (visible to ``torch.compile(fullgraph=True)``
and ``torch.export``; the implementation doubles as the fake one, mutation of the ``_`` forms is
declared). The per-channel coefficients are computed here with torch ops on (C,) vectors -- a
port of ops.cpp's ``set_coefficients``, ``inplace_channel``, ``xhat_channel``, ``linear_channel``,
``dense``/``like`` and ``geometry`` -- and the full-size work runs in the kernels of
kernels/abn_triton.py (see its docstring for layouts, modes and the ``PACK`` layout).

Triton runs CUDA and ROCm tensors (``torch.cuda``), and CPU tensors under its interpreter
(``TRITON_INTERPRET=1``, set before the kernels are imported; slow, for tests).
:func:`compile_ahead` compiles the kernels for NVIDIA / AMD targets without a GPU.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch
from torch import Tensor

from abnexp.norm.triton_launch import Geometry, elementwise, interpreting, kernels, reduce

NAMESPACE = "abnexp_triton"
DTYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

SCHEMAS = {  # kernels/ops.cpp, TORCH_LIBRARY(abnexp, m)
    "statistics": "(Tensor x) -> (Tensor mean, Tensor var, Tensor count)",
    "merge_statistics": "(Tensor mean, Tensor var, Tensor count) -> (Tensor mean, Tensor var, Tensor count)",
    "forward": "(Tensor x, Tensor mean, Tensor invstd, Tensor gamma, Tensor beta, str activation, "
               "float param) -> Tensor",
    "forward_": "(Tensor(a!) x, Tensor mean, Tensor invstd, Tensor gamma, Tensor beta, str activation, "
                "float param) -> ()",
    "inplace_backward_reduce": "(Tensor z, Tensor dz, Tensor gamma, Tensor beta, str activation, "
                               "float param, str variant) -> (Tensor sum_dy, Tensor sum_dy_t)",
    "inplace_backward_elementwise": "(Tensor z, Tensor dz, Tensor invstd, Tensor gamma, Tensor beta, "
                                    "Tensor sum_dy, Tensor sum_dy_t, int count, bool batch_stats, "
                                    "str activation, float param, str variant) -> Tensor",
    "inplace_backward_elementwise_": "(Tensor z, Tensor(a!) dz, Tensor invstd, Tensor gamma, Tensor beta, "
                                     "Tensor sum_dy, Tensor sum_dy_t, int count, bool batch_stats, "
                                     "str activation, float param, str variant) -> ()",
    "xhat_backward_reduce": "(Tensor x, Tensor dz, Tensor? z, Tensor? mean, Tensor? invstd, Tensor gamma, "
                            "Tensor beta, str activation, float param) -> (Tensor sum_dy, Tensor sum_dy_xhat)",
    "xhat_backward_elementwise": "(Tensor x, Tensor dz, Tensor? z, Tensor? mean, Tensor invstd, "
                                 "Tensor gamma, Tensor beta, Tensor sum_dy, Tensor sum_dy_xhat, int count, "
                                 "bool batch_stats, str activation, float param) -> Tensor",
    "xhat_backward_elementwise_": "(Tensor x, Tensor(a!) dz, Tensor? z, Tensor? mean, Tensor invstd, "
                                  "Tensor gamma, Tensor beta, Tensor sum_dy, Tensor sum_dy_xhat, int count, "
                                  "bool batch_stats, str activation, float param) -> ()",
    "linear_backward_reduce": "(Tensor x, Tensor dz, Tensor? z, str activation, float param) "
                              "-> (Tensor sum_dy, Tensor sum_dy_x)",
    "linear_backward_elementwise": "(Tensor x, Tensor dz, Tensor? z, Tensor a, Tensor b, Tensor c, "
                                   "str activation, float param) -> Tensor",
    "linear_backward_elementwise_": "(Tensor x, Tensor(a!) dz, Tensor? z, Tensor a, Tensor b, Tensor c, "
                                    "str activation, float param) -> ()",
}
_REGISTERED = False


def probe(device_type: str) -> Optional[str]:
    """None when Triton can run tensors of ``device_type`` now (and the operators are then
    registered), else a one-line reason naming what is missing and what to install or set."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no GPU is visible to torch (torch.cuda.is_available() is False)"
    if device_type == "cpu" and not interpreting():
        return "Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 (slow; for tests)"
    if device_type not in ("cuda", "cpu"):
        return f"Triton kernels serve CUDA/ROCm tensors, got device type {device_type!r}"
    try:
        k = kernels()
    except ImportError as err:
        return f"triton cannot be imported ({err}); install it with `pip install triton` (PyTorch's CUDA wheels ship it)"
    if (type(k.merge_kernel).__name__ == "InterpretedFunction") != interpreting():
        return ("the Triton kernels were imported with a different TRITON_INTERPRET in this process; set it "
                "before abnexp uses them")
    register()
    return None


# ---- layouts, geometry, per-channel vectors (ops.cpp) ----------------------------------------
def geometry(t: Tensor, channels_last: bool) -> Geometry:
    n, c, s = t.shape[0], t.shape[1], math.prod(t.shape[2:])
    if c == 1:
        return Geometry(1, 1, n * s, False)  # one channel: its values are contiguous
    if channels_last or s == 1:
        return Geometry(n * s, c, 1, True)
    return Geometry(n, c, s, False)


def compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _cl_dense(t: Tensor) -> bool:
    return t.movedim(1, -1).is_contiguous()


def dense(t: Tensor) -> tuple[Tensor, bool]:
    """``t`` itself when dense in one of the two layouts, else a dense copy; and whether the
    result is channels-last."""
    if t.is_contiguous():
        return t, False
    if _cl_dense(t):
        return t, True
    from torch._prims_common import suggest_memory_format
    if suggest_memory_format(t) != torch.contiguous_format:
        return t.movedim(1, -1).contiguous().movedim(-1, 1), True
    return t.contiguous(), False


def like(t: Tensor, channels_last: bool) -> Tensor:
    """``t`` in the memory order of a dense tensor with the given layout (a copy only if needed)."""
    if not channels_last:
        return t.contiguous()
    return t if _cl_dense(t) else t.movedim(1, -1).contiguous().movedim(-1, 1)


def check_input(x: Tensor, name: str) -> None:
    if x.dim() < 2:
        raise RuntimeError(f"abnexp: {name} must be (N, C, *), got {x.dim()}-D")
    if x.dtype not in DTYPES:
        raise RuntimeError(f"abnexp: {name} must be float64/32/16 or bfloat16, got {x.dtype}")


def channel_vector(v: Tensor, x: Tensor, name: str) -> Tensor:
    """A (C,) vector in x's compute dtype, contiguous, on x's device."""
    if v.dim() != 1 or v.shape[0] != x.shape[1]:
        raise RuntimeError(f"abnexp: {name} must have shape ({x.shape[1]},), got {tuple(v.shape)}")
    if v.device != x.device:
        raise RuntimeError(f"abnexp: {name} is on {v.device}, input on {x.device}")
    return v.to(compute_dtype(x)).contiguous()


def activation_code(name: str, inplace: bool = False) -> int:
    codes = {"identity": 0, "leaky_relu": 1, "elu": 2, "relu": 3}  # kernels/abn_triton.py
    if name not in codes:
        raise RuntimeError(f"abnexp: unknown activation '{name}'; valid: identity, leaky_relu, elu, relu")
    if inplace and name == "relu":
        raise RuntimeError("abnexp: relu is not invertible; in-place backward needs leaky_relu, elu or identity")
    return codes[name]


def pack(x: Tensor, param: float, **vectors: Tensor) -> Tensor:
    """The kernels' ``PACK`` in x's compute dtype: ``param`` (and padding to 4 values), then the
    named (C,) vectors in the order shift, mul, gamma, beta, a, b, k (absent ones zero). Built on
    x's device without a host-to-device copy."""
    cdt = compute_dtype(x)
    zero = x.new_zeros(x.shape[1], dtype=cdt)
    names = ("shift", "mul", "gamma", "beta", "a", "b", "k")
    return torch.cat([x.new_full((4,), param, dtype=cdt)] + [vectors.get(n, zero) for n in names])


# ---- the operators (ops.cpp) ------------------------------------------------------------------
def statistics(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    check_input(x, "x")
    xd, cl = dense(x)
    g, cdt = geometry(xd, cl), compute_dtype(x)
    mean, var = x.new_empty(x.shape[1], dtype=cdt), x.new_empty(x.shape[1], dtype=cdt)
    if g.count == 0:
        mean.fill_(math.nan)
        var.fill_(math.nan)
    elif g.channels > 0:
        reduce(xd, None, None, g, x.new_empty(4, dtype=cdt), kernels().STATS.value, 0, mean, var)
    return mean, var, torch.full((), float(g.count), dtype=cdt, device=x.device)


def merge_statistics(mean: Tensor, var: Tensor, count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if mean.dim() != 2 or var.shape != mean.shape:
        raise RuntimeError(f"abnexp: merge_statistics needs mean and var of shape (workers, C), got "
                           f"{tuple(mean.shape)} and {tuple(var.shape)}")
    if count.dim() != 1 or count.shape[0] != mean.shape[0]:
        raise RuntimeError(f"abnexp: merge_statistics needs count of shape (workers,), got {tuple(count.shape)}")
    from abnexp.norm.functional import merge_statistics as merge
    return merge(mean, var, count)


def _forward_into(x: Tensor, xd: Tensor, cl: bool, mean: Tensor, invstd: Tensor, gamma: Tensor,
                  beta: Tensor, activation: str, param: float, out: Tensor) -> None:
    scale = channel_vector(invstd, x, "invstd") * channel_vector(gamma, x, "gamma")
    p = pack(x, param, shift=channel_vector(mean, x, "mean"), mul=scale, beta=channel_vector(beta, x, "beta"))
    act = activation_code(activation)
    if x.numel() > 0:
        elementwise(xd, None, None, out, geometry(xd, cl), p, kernels().FORWARD.value, act)


def forward(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, activation: str,
            param: float) -> Tensor:
    check_input(x, "x")
    xd, cl = dense(x)
    out = torch.empty_like(xd)
    _forward_into(x, xd, cl, mean, invstd, gamma, beta, activation, param, out)
    return out


def forward_(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, activation: str,
             param: float) -> None:
    check_input(x, "x")
    xd, cl = dense(x)
    _forward_into(x, xd, cl, mean, invstd, gamma, beta, activation, param, xd)
    if xd is not x:
        x.copy_(xd)


def _check_same(a: Tensor, b: Tensor, name: str) -> None:
    if a.shape != b.shape:
        raise RuntimeError(f"abnexp: {name} has shape {tuple(b.shape)}, expected {tuple(a.shape)}")
    if a.dtype != b.dtype or a.device != b.device:
        raise RuntimeError(f"abnexp: {name} must have the dtype and device of the saved tensor")


def _prepare(src: Tensor, dz: Tensor, z: Optional[Tensor]):
    """The saved tensors of one backward call in src's dense layout, and its geometry."""
    check_input(src, "saved tensor")
    _check_same(src, dz, "dz")
    s, cl = dense(src)
    if z is not None:
        _check_same(src, z, "z")
        z = like(z, cl)
    return s, like(dz, cl), z, geometry(s, cl)


def _sums(src: Tensor, dz: Tensor, z: Optional[Tensor], vectors: dict, mode: int, act: int, param: float):
    s, dzl, zl, g = _prepare(src, dz, z)
    cdt = compute_dtype(src)
    s1, s2 = src.new_zeros(g.channels, dtype=cdt), src.new_zeros(g.channels, dtype=cdt)
    p = pack(src, param, **vectors)
    if src.numel() > 0:
        reduce(s, zl, dzl, g, p, mode, act, s1, s2)
    return s1, s2


def _grad_input(src: Tensor, dz: Tensor, z: Optional[Tensor], vectors: dict, mode: int, act: int,
                param: float, into: bool) -> Tensor:
    """dL/dx into dz itself when ``into`` (the ``_`` operators), else into a new tensor."""
    s, dzl, zl, g = _prepare(src, dz, z)
    dx = dzl if into else torch.empty_like(s)
    if src.numel() > 0:
        elementwise(s, zl, dzl, dx, g, pack(src, param, **vectors), mode, act)
    if into and dx is not dz:
        dz.copy_(dx)  # dz was not in src's layout
    return dx


def coefficients(x: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, sum_dy: Tensor, sum_dy_t: Tensor,
                 count: int, batch_stats: bool, y_form: bool) -> dict:
    """dL/dx = a dy + b t + k: the xhat form (variant I, checkpointing, ABN) or y form (variant II)
    of InPlace-ABN's supplementary; eval mode (batch_stats False): dL/dx = gamma invstd dL/dy."""
    g, inv = channel_vector(gamma, x, "gamma"), channel_vector(invstd, x, "invstd")
    s1, s2 = channel_vector(sum_dy, x, "sum_dy"), channel_vector(sum_dy_t, x, "sum_dy_t")
    a = g * inv
    if not batch_stats or x.numel() == 0:  # an empty input has no dL/dx to compute (as ops.cpp)
        return {"a": a}
    if count <= 0:
        raise RuntimeError(f"abnexp: count must be positive, got {count}")
    if not y_form:
        return {"a": a, "b": -a * s2 / count, "k": -a * s1 / count}
    b = channel_vector(beta, x, "beta")
    dgamma = (s2 - b * s1) / g
    return {"a": a, "b": -inv * dgamma / count, "k": -a * (s1 - b * dgamma / g) / count}


def inplace_channel(z: Tensor, gamma: Tensor, beta: Tensor, variant: str) -> dict:
    """t = (act^-1(z) - shift) * mul: xhat (variant I) or y (variant II)."""
    if variant not in ("I", "II"):
        raise RuntimeError(f"abnexp: unknown in-place variant '{variant}'; valid: I, II")
    if variant == "II":
        return {"mul": z.new_ones(z.shape[1], dtype=compute_dtype(z))}
    return {"shift": channel_vector(beta, z, "beta"), "mul": channel_vector(gamma, z, "gamma").reciprocal()}


def xhat_channel(x: Tensor, mean: Optional[Tensor], invstd: Optional[Tensor], gamma: Tensor, beta: Tensor) -> dict:
    """t = xhat = (x - mean) * invstd (x itself when mean is None); z = act(gamma t + beta)."""
    ch = {"gamma": channel_vector(gamma, x, "gamma"), "beta": channel_vector(beta, x, "beta")}
    if mean is None:
        return {**ch, "mul": x.new_ones(x.shape[1], dtype=compute_dtype(x))}
    if invstd is None:
        raise RuntimeError("abnexp: xhat backward with mean needs invstd")
    return {**ch, "shift": channel_vector(mean, x, "mean"), "mul": channel_vector(invstd, x, "invstd")}


def linear_channel(x: Tensor, z: Optional[Tensor], activation: str) -> dict:
    """t = x, dL/dy = act'(z) dz (z None: the identity)."""
    if activation_code(activation) != 0 and z is None:
        raise RuntimeError(f"abnexp: linear backward with activation '{activation}' needs the saved output z")
    one = x.new_ones(x.shape[1], dtype=compute_dtype(x))
    return {"mul": one, "gamma": one}


def _xhat_mode(z: Optional[Tensor]) -> int:
    return (kernels().XHAT_Z if z is not None else kernels().XHAT).value


def inplace_backward_reduce(z, dz, gamma, beta, activation, param, variant):
    act = activation_code(activation, inplace=True)
    return _sums(z, dz, None, inplace_channel(z, gamma, beta, variant), kernels().INPLACE.value, act, param)


def _inplace_grad(z, dz, invstd, gamma, beta, sum_dy, sum_dy_t, count, batch_stats, activation, param,
                  variant, into):
    act = activation_code(activation, inplace=True)
    ch = {**inplace_channel(z, gamma, beta, variant),
          **coefficients(z, invstd, gamma, beta, sum_dy, sum_dy_t, count, batch_stats, variant == "II")}
    return _grad_input(z, dz, None, ch, kernels().INPLACE.value, act, param, into)


def inplace_backward_elementwise(z, dz, invstd, gamma, beta, sum_dy, sum_dy_t, count, batch_stats,
                                 activation, param, variant):
    return _inplace_grad(z, dz, invstd, gamma, beta, sum_dy, sum_dy_t, count, batch_stats, activation, param,
                         variant, False)


def inplace_backward_elementwise_(z, dz, invstd, gamma, beta, sum_dy, sum_dy_t, count, batch_stats,
                                  activation, param, variant):
    _inplace_grad(z, dz, invstd, gamma, beta, sum_dy, sum_dy_t, count, batch_stats, activation, param,
                  variant, True)


def xhat_backward_reduce(x, dz, z, mean, invstd, gamma, beta, activation, param):
    act = activation_code(activation)
    return _sums(x, dz, z, xhat_channel(x, mean, invstd, gamma, beta), _xhat_mode(z), act, param)


def _xhat_grad(x, dz, z, mean, invstd, gamma, beta, sum_dy, sum_dy_xhat, count, batch_stats, activation,
               param, into):
    act = activation_code(activation)
    ch = {**xhat_channel(x, mean, invstd, gamma, beta),
          **coefficients(x, invstd, gamma, beta, sum_dy, sum_dy_xhat, count, batch_stats, False)}
    return _grad_input(x, dz, z, ch, _xhat_mode(z), act, param, into)


def xhat_backward_elementwise(x, dz, z, mean, invstd, gamma, beta, sum_dy, sum_dy_xhat, count, batch_stats,
                              activation, param):
    return _xhat_grad(x, dz, z, mean, invstd, gamma, beta, sum_dy, sum_dy_xhat, count, batch_stats,
                      activation, param, False)


def xhat_backward_elementwise_(x, dz, z, mean, invstd, gamma, beta, sum_dy, sum_dy_xhat, count, batch_stats,
                               activation, param):
    _xhat_grad(x, dz, z, mean, invstd, gamma, beta, sum_dy, sum_dy_xhat, count, batch_stats, activation,
               param, True)


def linear_backward_reduce(x, dz, z, activation, param):
    act = activation_code(activation)
    return _sums(x, dz, z, linear_channel(x, z, activation), _xhat_mode(z), act, param)


def _linear_grad(x, dz, z, a, b, c, activation, param, into):
    act = activation_code(activation)
    ch = {**linear_channel(x, z, activation), "a": channel_vector(a, x, "a"), "b": channel_vector(b, x, "b"),
          "k": channel_vector(c, x, "c")}
    return _grad_input(x, dz, z, ch, _xhat_mode(z), act, param, into)


def linear_backward_elementwise(x, dz, z, a, b, c, activation, param):
    return _linear_grad(x, dz, z, a, b, c, activation, param, False)


def linear_backward_elementwise_(x, dz, z, a, b, c, activation, param):
    _linear_grad(x, dz, z, a, b, c, activation, param, True)


def register() -> None:
    """Define ``torch.ops.abnexp_triton.<op>`` for every schema of :data:`SCHEMAS` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from torch.library import triton_op
    for name, schema in SCHEMAS.items():
        mutates = re.findall(r"Tensor\(a!\) (\w+)", schema)
        triton_op(f"{NAMESPACE}::{name}", globals()[name], mutates_args=mutates, schema=schema)
    _REGISTERED = True


def compile_ahead(archs: list[str], full: bool = False) -> list[dict]:
    """Compile the kernels for ``archs`` ("sm_80", "sm_90", "gfx942") without a GPU; one row per
    kernel specialization and arch (see :func:`abnexp.norm.triton_launch.compile_ahead`)."""
    from abnexp.norm import triton_launch
    return triton_launch.compile_ahead(archs, full)


def ops():
    """``torch.ops.abnexp_triton`` (after :func:`register`)."""
    return getattr(torch.ops, NAMESPACE)
