"""Precision of the BN + activation strategies under AMP (fp16, bf16) against float64 truth.

Regenerate: ``python scripts/amp_precision.py`` (about a minute on 2 CPU cores; writes
results/amp_precision.md).

For each input kind, channel scale and low dtype, one BN + LeakyReLU(0.01) training step of every
strategy of InPlace-ABN (Rota Bulò et al., CVPR 2018, Fig. 2: ``bn`` = standard, ``checkpoint``,
``checkpoint_proposed``, ``inplace_abn`` (I), ``inplace_abn_ii`` (II)) runs as AMP runs it: input x
and upstream gradient dL/dz in the low dtype (as an autocast convolution hands them over), weight and
bias in float32, under ``torch.autocast``. ``BatchNorm2d`` + ``F.leaky_relu`` under the same
autocast is the reference whose own errors are the yardstick. Truth: the same step in float64 from
the same (low-precision) x, dL/dz and parameters, by autograd through ``F.batch_norm``; the
in-place strategies' truth uses their effective scale |weight| + eps.

Errors are relative L2 norms ||g - g_true|| / ||g_true|| of dL/dx, dL/dgamma, dL/dbeta. The
"floor" of a strategy is the error of exact (float64) arithmetic from what it keeps for backward
rounded to the low dtype -- z for InPlace-ABN I/II (the output is the input's storage), xhat for
the proposed checkpointing (kept in the input's dtype) -- which no implementation of that strategy
can beat; ``bn`` and ``checkpoint`` keep x itself (no floor beyond BatchNorm2d's). A strategy is
flagged when its error exceeds 2x max(BatchNorm2d's error, its floor).

Input kinds (C = 16 channels, 8 x 16 x 16 values each): ``random`` -- x ~ N(0, s^2), weight ~
U(0.5, 1.5), bias ~ N(0, 0.1^2); ``trained`` -- activations as a trained network's layer sees
them: per-channel means ~ N(0, (2s)^2), standard deviations log-uniform in [0.1 s, 10 s], Laplace
tails, weight log-uniform in [0.05, 5], bias ~ N(0, 1) (so |beta| / gamma reaches 20). s is the
channel scale.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from abnexp.norm import NORM_LAYERS
from abnexp.norm import functional as Fn

STRATEGIES = ("bn", "checkpoint", "checkpoint_proposed", "inplace_abn", "inplace_abn_ii")
INPLACE = ("inplace_abn", "inplace_abn_ii")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SCALES = (0.01, 1.0, 100.0)
KINDS = ("random", "trained")
SLOPE, EPS, C, SHAPE = 0.01, 1e-5, 16, (8, 16, 16, 16)


def make_case(kind: str, scale: float, seed: int = 0):
    """(x, dz, weight, bias) in float64 (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * scale
        weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
        bias = torch.randn(C, generator=g, dtype=torch.float64) * 0.1
    else:
        mean = torch.randn(C, generator=g, dtype=torch.float64) * 2 * scale
        std = scale * 10 ** (torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1)
        u = torch.rand(SHAPE, generator=g, dtype=torch.float64) - 0.5
        laplace = -u.sign() * torch.log1p(-2 * u.abs()) / 2 ** 0.5  # unit variance
        x = laplace * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
        weight = 0.05 * 100 ** torch.rand(C, generator=g, dtype=torch.float64)
        bias = torch.randn(C, generator=g, dtype=torch.float64)
    dz = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return x, dz, weight, bias


def truth(x, dz, gamma, beta):
    """float64 autograd through BN + LeakyReLU: (z, dL/dx, dL/dgamma, dL/dbeta, xhat)."""
    x, gamma, beta = (t.detach().double().clone().requires_grad_() for t in (x, gamma, beta))
    y = F.batch_norm(x, None, None, gamma, beta, True, 0.0, EPS)
    z = F.leaky_relu(y, SLOPE)
    z.backward(dz.double())
    var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=0)
    xhat = (x.detach() - mean.view(1, -1, 1, 1)) / (var + EPS).sqrt().view(1, -1, 1, 1)
    return z.detach(), x.grad, gamma.grad, beta.grad, xhat


def run_strategy(name, x, dz, weight, bias, dtype):
    """One autocast training step; (dL/dx, dL/dweight, dL/dbias) as float64."""
    if name == "BatchNorm2d":
        layer, act = torch.nn.BatchNorm2d(C, eps=EPS), (lambda y: F.leaky_relu(y, SLOPE))
    else:
        layer = NORM_LAYERS[name](C, eps=EPS, activation="leaky_relu", activation_param=SLOPE)
        act = (lambda y: y)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    leaf = x.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        z = act(layer(leaf.clone()))
    z.backward(dz.to(dtype).to(z.dtype))
    return leaf.grad.double(), layer.weight.grad.double(), layer.bias.grad.double()


def floor(name, x, dz, gamma, beta, dtype, true_z, true_xhat):
    """Exact (float64) gradients from the kept tensor rounded to ``dtype``; None where the strategy
    keeps x itself (its floor is BatchNorm2d's)."""
    x, dz = x.double(), dz.double()
    var = torch.var_mean(x, dim=(0, 2, 3), correction=0)[0]
    invstd = (var + EPS).rsqrt()
    m = Fn.values_per_channel(x)
    if name in INPLACE:
        variant = "I" if name == "inplace_abn" else "II"
        z = true_z.to(dtype).double()
        dy, t, sum_dy, sum_dy_t = Fn.inplace_backward_reduce(z, dz, gamma, beta, "leaky_relu", SLOPE, variant)
        if variant == "I":
            dx = Fn.grad_input_xhat(dy, t, invstd, gamma, sum_dy, sum_dy_t, m, True, torch.float64)
            return dx, sum_dy_t, sum_dy
        dgamma = Fn.grad_gamma_y(sum_dy, sum_dy_t, gamma, beta)
        return Fn.grad_input_y(dy, t, invstd, gamma, beta, sum_dy, sum_dy_t, m, True, torch.float64), dgamma, sum_dy
    if name == "checkpoint_proposed":
        xhat = true_xhat.to(dtype).double()
        dy, sum_dy, sum_dy_xhat = Fn.checkpoint_backward_reduce(xhat, dz, gamma, beta, "leaky_relu", SLOPE)
        return Fn.grad_input_xhat(dy, xhat, invstd, gamma, sum_dy, sum_dy_xhat, m, True, torch.float64), \
            sum_dy_xhat, sum_dy
    return None


def rel(got, ref) -> float:
    return float((got - ref).norm() / ref.norm())


def measure():
    """Rows (dtype, kind, scale, strategy, errors (dx, dgamma, dbeta), floor errors or None, BN errors)."""
    rows = []
    for dname, dtype in DTYPES.items():
        for kind in KINDS:
            for scale in SCALES:
                x, dz, weight, bias = make_case(kind, scale)
                x, dz = x.to(dtype).double(), dz.to(dtype).double()  # what AMP hands over, exactly
                weight, bias = weight.float().double(), bias.float().double()
                z, dx, dg, db, xhat = truth(x, dz, weight, bias)
                bn = [rel(a, b) for a, b in zip(run_strategy("BatchNorm2d", x, dz, weight, bias, dtype), (dx, dg, db))]
                rows.append((dname, kind, scale, "BatchNorm2d", bn, None, bn))
                for name in STRATEGIES:
                    gamma = weight.abs() + EPS if name in INPLACE else weight
                    ref = truth(x, dz, gamma, bias) if name in INPLACE else (z, dx, dg, db, xhat)
                    got = run_strategy(name, x, dz, weight, bias, dtype)
                    errs = [rel(a, b) for a, b in zip(got, ref[1:4])]
                    fl = floor(name, x, dz, gamma, bias, dtype, ref[0], ref[4])
                    fl = None if fl is None else [rel(a, b) for a, b in zip(fl, ref[1:4])]
                    rows.append((dname, kind, scale, name, errs, fl, bn))
    return rows


def verdict(errs, fl, bn) -> str:
    bound = [2 * max(b, f) for b, f in zip(bn, fl or bn)]
    return "ok" if all(e <= b for e, b in zip(errs, bound)) else "WORSE"


def render(rows) -> str:
    fmt = lambda v: f"{v:.1e}"  # noqa: E731
    lines = ["# Gradient precision under AMP (BN + LeakyReLU(0.01), float64 truth)", "",
             "Regenerate: `python scripts/amp_precision.py` (see its docstring for the setup). Relative L2 errors",
             "||g - g_true|| / ||g_true||; *floor*: exact arithmetic from the tensor the strategy keeps, rounded to",
             "the low dtype (no implementation of the strategy can do better); *ok*: within 2x max(BatchNorm2d,",
             "floor) for all three gradients.", "",
             "| dtype | inputs | scale | strategy | dL/dx | dL/dγ | dL/dβ | floor dL/dx, dγ, dβ | vs BN, floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dname, kind, scale, name, errs, fl, bn in rows:
        floor_text = "—" if fl is None else ", ".join(map(fmt, fl))
        check = "(reference)" if name == "BatchNorm2d" else verdict(errs, fl, bn)
        lines.append(f"| {dname} | {kind} | {scale:g} | {name} | {' | '.join(map(fmt, errs))} | {floor_text} | {check} |")
    lines += ["", "Worst case per strategy and dtype (max over inputs and scales; ratio to BatchNorm2d's error):", "",
              "| dtype | strategy | dL/dx | dL/dγ | dL/dβ | dL/dγ floor |", "|---|---|---|---|---|---|"]
    for dname in DTYPES:
        for name in STRATEGIES:
            sel = [r for r in rows if r[0] == dname and r[3] == name]
            worst = [max(r[4][i] for r in sel) for i in range(3)]
            ratio = [max(r[4][i] / max(r[6][i], 1e-30) for r in sel) for i in range(3)]
            fl = max((r[5][1] for r in sel if r[5] is not None), default=None)
            cells = [f"{fmt(w)} ({q:.1f}x)" for w, q in zip(worst, ratio)]
            lines.append(f"| {dname} | {name} | {' | '.join(cells)} | {'—' if fl is None else fmt(fl)} |")
    lines += ["", summary(rows)]
    return "\n".join(lines) + "\n"


def summary(rows) -> str:
    """The reading of the table, from its numbers."""
    ours = [r for r in rows if r[3] != "BatchNorm2d"]
    at_floor = [r for r in ours if r[5] is not None]
    excess = max(e / max(f, b) for r in at_floor for e, f, b in zip(r[4], r[5], r[6]))
    kept_x = max(e / b for r in ours if r[5] is None for e, b in zip(r[4], r[6]))
    worst = {d: max(r[4][1] for r in at_floor if r[0] == d) for d in DTYPES}
    flagged = [r for r in ours if verdict(r[4], r[5], r[6]) != "ok"]
    return (f"Reading: the strategies that keep x (bn, checkpoint) stay within {kept_x:.1f}x BatchNorm2d's errors. "
            f"InPlace-ABN I/II and the proposed checkpointing keep a rounded z / xhat; their errors are at most "
            f"{excess:.2f}x the floor of that rounding (the kernels already invert the activation in float32), so "
            f"what separates them from BatchNorm2d -- dL/dγ up to {worst['fp16']:.0e} (fp16) / {worst['bf16']:.0e} "
            f"(bf16) relative, worst with trained-like inputs where |β|/γ is large, and for the proposed strategy "
            f"dL/dβ and dL/dx where the recomputed y changes sign -- is the precision of the kept tensor, which no "
            f"implementation of these strategies can recover. {len(flagged)} row(s) flagged.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/amp_precision.md")
    args = parser.parse_args()
    text = render(measure())
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
