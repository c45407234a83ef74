"""The Triton backend (kernels/abn_triton.py, abnexp.norm.triton_backend) proven without a GPU.

Every operator runs under Triton's interpreter (TRITON_INTERPRET=1, numpy on CPU tensors) against
the PyTorch reference path of abnexp.norm.functional, in the cases of ``abnexp kernels check``
(abnexp.commands.kernels: both layouts, C = 1, two values per channel, sizes that are not a
multiple of the tile, mean-1e4 inputs). The interpreter runs all four dtypes: float64, float32,
float16 and bfloat16 (bfloat16 is emulated in numpy as float32 rounded on load and store). The
layers run their Triton path and are compared with torch.nn.BatchNorm2d + the activation under
autograd, or with their own PyTorch path (MABN, CBN). The kernels are compiled ahead of time for
sm_80, sm_90 and gfx942 with Triton's own compiler in a process without the interpreter.

The interpreter runs each program in Python (about 20 ms per tile): the default run covers
float32 on small shapes and one small shape per other dtype; the full check is marked slow.
The kernels are imported under the interpreter by a module fixture and re-imported compiled
afterwards, so other test modules see ordinary Triton kernels.
"""
from __future__ import annotations

import copy
import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("triton", reason="triton is not installed (PyTorch's CUDA wheels ship it)")

from abnexp.commands import kernels as K  # noqa: E402
from abnexp.norm import functional as Fn  # noqa: E402
from abnexp.norm import NORM_LAYERS, backends, make_activation, triton_backend, triton_launch  # noqa: E402
from abnexp.norm.cbn import CBN2d  # noqa: E402
from abnexp.norm.mabn import MABN2d  # noqa: E402
from abnexp.norm.sync import InPlaceABNSync, SyncABN  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAST_SHAPES = ((5, 3, 7, 9), (2, 1), (3, 1, 13, 11), (2, 5))
"""Odd sizes of the check: 63 positions (not a multiple of a tile), C = 1 (twice), two values per
channel (twice: (2, 1) and a 2-D input), channels-last for the 4-D one; the other shapes of the
check run in the slow test."""


@pytest.fixture(scope="module")
def ops():
    """``torch.ops.abnexp_triton`` with the kernels imported under the interpreter."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    module = importlib.reload(importlib.import_module("abnexp.kernels.abn_triton"))
    assert type(module.merge_kernel).__name__ == "InterpretedFunction"
    assert triton_backend.probe("cpu") is None
    yield triton_backend.ops()
    patch.undo()
    importlib.reload(module)


def shapes(layout, candidates):
    return [s for s in candidates if layout == "contiguous" or len(s) >= 3]


def check(ops, group, dtype, layout, candidates, large_mean=False):
    """(every (what, error, tolerance) of the check group on these shapes, those over tolerance)."""
    results = []
    for shape in shapes(layout, candidates):
        x = K.make_input(shape, dtype, layout, "cpu", large_mean)
        results += [(f"{shape} {what}", err, tol) for what, err, tol in K.CHECKS[group](ops, x)]
    return results, [r for r in results if not r[1] <= r[2]]


# --------------------------------------------------------------------------- operators
def test_schemas_are_those_of_ops_cpp(ops):
    """Each operator's schema is the one of TORCH_LIBRARY(abnexp) in kernels/ops.cpp (read as text)."""
    text = (ROOT / "kernels" / "ops.cpp").read_text()
    defs = ["".join(re.findall(r'"([^"]*)"', d)) for d in re.findall(r"m\.def\((.*?)\);", text, re.S)]
    assert len(defs) == len(triton_backend.SCHEMAS) == 13
    for d in defs:
        name = d.split("(")[0]
        assert str(getattr(ops, name).default._schema) == f"abnexp_triton::{d}"


@pytest.mark.parametrize("layout", K.LAYOUTS)
@pytest.mark.parametrize("group", list(K.CHECKS))
def test_operators_float32(ops, group, layout):
    results, bad = check(ops, group, torch.float32, layout, FAST_SHAPES)
    assert results and not bad, bad[:5]


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("group", list(K.CHECKS))
def test_operators_other_dtypes(ops, group, dtype):
    results, bad = check(ops, group, K.DTYPES[dtype], "channels_last", ((5, 3, 7, 9),))
    assert results and not bad, bad[:5]


@pytest.mark.parametrize("layout", ["contiguous", pytest.param("channels_last", marks=pytest.mark.slow)])
def test_statistics_mean_1e4_float32(ops, layout):
    """1e-5 relative on mean-1e4, std-1 float32 inputs (the check's input: 78k values per channel,
    21 partials per channel merged), against the float64 statistics."""
    results, bad = check(ops, "statistics", torch.float32, layout, ((3, 5, 123, 211),), large_mean=True)
    assert results and not bad, bad[:5]


@pytest.mark.slow  # a subprocess runs every check case under the interpreter (minutes)
def test_check_command_passes_under_the_interpreter():
    """`TRITON_INTERPRET=1 ABNEXP_KERNELS=triton abnexp kernels check --backend triton --quick`:
    every operator group, every dtype, both layouts, every shape of the check and the mean-1e4
    input at its --quick size, against the reference path (exit 0, no FAIL line)."""
    env = dict(os.environ, TRITON_INTERPRET="1", ABNEXP_KERNELS="triton")
    done = subprocess.run([sys.executable, "-m", "abnexp", "kernels", "check", "--backend", "triton",
                           "--device", "cpu", "--quick"], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(lines) == len(K.CHECKS) * len(K.DTYPES) * len(K.LAYOUTS)
    assert all(line.startswith("ok   triton cpu") for line in lines)
    assert "all operators match" in done.stdout


@pytest.mark.slow
def test_backward_mean_1e4_float32(ops):
    """ABN's backward (x-hat form with saved z) on the mean-1e4 check input: the sums to 1e-5 of
    their size and dL/dx to 1e-5 of |dL/dz| gamma invstd, against the float64 reference."""
    x = K.make_input((3, 5, 123, 211), torch.float32, "channels_last", "cpu", large_mean=True)
    dz = K.make_input(x.shape, torch.float32, "contiguous", "cpu", seed=3)
    mean, var = Fn.batch_statistics(x.double())
    params = Fn.inverse_std(var, 1e-5), torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5).double()
    f32 = [v.float() for v in (mean, *params)]  # what a float32 layer passes
    mean, invstd, gamma, beta = (v.double() for v in f32)  # the reference uses the same values
    z = Fn.forward(x.double(), mean, invstd, gamma, beta, "leaky_relu", 0.1)
    xhat = Fn.normalize(x.double(), mean, invstd)
    dy = torch.where(z > 0, dz.double(), dz.double() * 0.1)
    s1, s2 = Fn.backward_reduce(dy, xhat)
    n1, n2 = ops.xhat_backward_reduce(x, dz, z.float(), f32[0], f32[1], f32[2], f32[3], "leaky_relu", 0.1)
    scale = dy.abs().sum((0, 2, 3)).max().item()
    assert K.relative_error(n1, s1, scale) < 1e-5 and K.relative_error(n2, s2, scale * xhat.abs().max().item()) < 1e-5
    ref = Fn.grad_input_xhat(dy.clone(), xhat, invstd, gamma, s1, s2, Fn.values_per_channel(x), True, torch.float64)
    dx = ops.xhat_backward_elementwise(x, dz, z.float(), f32[0], f32[1], f32[2], f32[3], n1, n2,
                                       Fn.values_per_channel(x), True, "leaky_relu", 0.1)
    assert K.relative_error(dx, ref, K._grad_scale(dz, invstd, gamma)) < 1e-5


def test_empty_inputs_launch_nothing(ops):
    """A batch of 0: NaN statistics (as the C++ kernels), count 0, empty outputs, zero sums; an
    empty spatial dimension likewise."""
    for shape in ((0, 3, 4, 5), (2, 3, 0, 5)):
        x = torch.randn(shape)
        mean, var, count = ops.statistics(x)
        assert mean.shape == (3,) and mean.isnan().all() and var.isnan().all() and count.item() == 0
        one, zero = torch.ones(3), torch.zeros(3)
        assert ops.forward(x, zero, one, one, zero, "elu", 1.0).shape == shape
        s1, s2 = ops.xhat_backward_reduce(x, x, None, zero, one, one, zero, "leaky_relu", 0.1)
        assert not s1.any() and not s2.any()
        assert ops.linear_backward_elementwise(x, x, None, one, one, one, "identity", 0.0).shape == shape


def test_argument_errors(ops):
    x, one = torch.randn(2, 3, 4), torch.ones(3)
    with pytest.raises(RuntimeError, match="count must be positive"):
        ops.xhat_backward_elementwise(x, x, None, None, one, one, one, one, one, 0, True, "identity", 0.0)
    with pytest.raises(RuntimeError, match="relu is not invertible"):
        ops.inplace_backward_reduce(x, x, one, one, "relu", 0.0, "I")
    with pytest.raises(RuntimeError, match="unknown in-place variant 'III'"):
        ops.inplace_backward_reduce(x, x, one, one, "elu", 1.0, "III")
    with pytest.raises(RuntimeError, match=r"gamma must have shape \(3,\)"):
        ops.forward(x, one, one, torch.ones(4), one, "elu", 1.0)
    with pytest.raises(RuntimeError, match="needs the saved output z"):
        ops.linear_backward_reduce(x, x, None, "elu", 1.0)


def test_torch_export_keeps_the_operators(ops):
    """torch.export records the operators (shapes from their fake implementations) and the
    exported program computes what eager mode does, including the in-place forward_."""

    class Layer(torch.nn.Module):
        def forward(self, x, gamma, beta):
            mean, var, _ = ops.statistics(x)
            z = ops.forward(x, mean, torch.rsqrt(var + 1e-5), gamma, beta, "leaky_relu", 0.1)
            ops.forward_(x, mean, torch.rsqrt(var + 1e-5), gamma, beta, "elu", 1.0)
            return z, x

    x, gamma, beta = torch.randn(2, 3, 4, 5), torch.rand(3) + 0.5, torch.randn(3)
    program = torch.export.export(Layer(), (x.clone(), gamma, beta))
    called = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"abnexp_triton.statistics.default", "abnexp_triton.forward.default",
            "abnexp_triton.forward_.default"} <= called
    got, ref = program.module()(x.clone(), gamma, beta), Layer()(x.clone(), gamma, beta)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("shape, layout", [((16, 256, 512, 512), "contiguous"), ((16, 256, 512, 512), "channels_last"),
                                           ((8, 64, 1024, 2048), "contiguous"), ((8, 64, 1024, 2048), "channels_last"),
                                           ((1, 2048, 7, 7), "contiguous"), ((2**20, 4096), "contiguous"),
                                           ((1, 1, 2**33), "contiguous"), ((3, 2**31), "contiguous")])
def test_grids_stay_inside_hardware_limits(shape, layout):
    """Grid axis 0 < 2^31, axis 1 <= 65535 (the elementwise kernels' grid-stride loops cover the
    rest) and a bounded number of partials per channel, at sizes no CPU test could allocate."""
    n, c, s = shape[0], shape[1], math.prod(shape[2:])
    g = triton_backend.geometry(_Shape(shape), layout == "channels_last")
    assert g.count * g.channels == n * c * s
    first, merge = triton_launch.reduce_plans(g)
    plan = triton_launch.elementwise_plan(g)
    for p in (first, merge, plan):
        assert 1 <= p.grid[0] < 2**31 and all(1 <= d <= 65535 for d in p.grid[1:]), p
    # partials per channel: MAX_PARTIALS, plus one per sample when a sample's plane is split
    assert merge.sizes[0] <= triton_launch.MAX_PARTIALS + n


class _Shape:
    """Just the shape of a tensor (for :func:`triton_backend.geometry`)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)


# --------------------------------------------------------------------------- layers
@pytest.fixture
def triton_layers(ops, monkeypatch):
    """ABNEXP_KERNELS=triton for the layers; counts the Triton operators they call."""
    monkeypatch.setattr(backends, "REQUESTED", "triton")
    monkeypatch.setattr(backends, "_CHOSEN", {})
    calls = {}

    class Spy:
        def __getattr__(self, name):
            calls[name] = calls.get(name, 0) + 1
            return getattr(ops, name)

    monkeypatch.setattr(backends, "ops", lambda x: Spy())
    return calls


def bn_pair(name, c, act, param, dtype=torch.float64):
    """(layer, BatchNorm2d, activation) with equal random positive weights (the in-place layers
    use |weight| + eps, given to BatchNorm2d)."""
    g = torch.Generator().manual_seed(0)
    layer = NORM_LAYERS[name](c, activation=act, activation_param=param).to(dtype)
    bn = torch.nn.BatchNorm2d(c).to(dtype)
    with torch.no_grad():
        w, b = torch.rand(c, generator=g, dtype=dtype) + 0.5, torch.randn(c, generator=g, dtype=dtype) * 0.3
        layer.weight.copy_(w)
        layer.bias.copy_(b)
        bn.weight.copy_(w + (layer.eps if layer.inplace else 0.0))
        bn.bias.copy_(b)
    return layer, bn, make_activation(act, param)


def compare_with_batchnorm(name, layout, act, param):
    """(got, expected) pairs of the layer on the Triton path and BatchNorm2d + activation: output,
    dL/dx, dL/dweight, dL/dbias, running mean and variance."""
    x = K.make_input((4, 5, 3, 7), torch.float64, layout, "cpu")
    dz = K.make_input((4, 5, 3, 7), torch.float64, layout, "cpu", seed=7)
    layer, bn, phi = bn_pair(name, 5, act, param)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(xa.clone() if layer.inplace else xa)
    ref = phi(bn(xb))
    out.backward(dz)
    ref.backward(dz)
    return ((out, ref), (xa.grad, xb.grad), (layer.weight.grad, bn.weight.grad), (layer.bias.grad, bn.bias.grad),
            (layer.running_mean, bn.running_mean), (layer.running_var, bn.running_var))



@pytest.mark.parametrize("layout", ["contiguous", pytest.param("channels_last", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name, act, param", [("bn", "relu", 0.0), ("checkpoint", "elu", 1.0),
                                              ("checkpoint_proposed", "leaky_relu", 0.1),
                                              ("inplace_abn", "leaky_relu", 0.01), ("inplace_abn_ii", "elu", 1.0)])
def test_strategies_equal_batchnorm(name, act, param, layout, triton_layers):
    """ABN, the two checkpointed strategies and InPlace-ABN I / II on the Triton path, float64:
    output, dL/dx, dL/dweight, dL/dbias and running statistics of BatchNorm2d + activation."""
    pairs = compare_with_batchnorm(name, layout, act, param)
    assert triton_layers.get("statistics") and any(k.endswith("_elementwise") or k.endswith("_elementwise_")
                                                   for k in triton_layers)
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.fixture
def synchronized(monkeypatch, tmp_path):
    """The synchronized layers over a one-rank gloo group (their collectives run)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    for cls in (SyncABN, InPlaceABNSync):
        monkeypatch.setattr(cls, "sync_group", lambda self: dist.group.WORLD if self.training else None)
    yield
    if created:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["syncbn", "inplace_abn_sync", "inplace_abn_sync_ii"])
def test_synchronized_layers_equal_batchnorm(name, synchronized, triton_layers):
    pairs = compare_with_batchnorm(name, "channels_last", "leaky_relu", 0.01)
    assert triton_layers.get("statistics") and any(k.endswith("_elementwise") or k.endswith("_elementwise_")
                                                   for k in triton_layers)
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def run_steps(pre, layer, xs, requested, monkeypatch):
    """Outputs and gradients of a few training steps of layer(pre(x)), then the layer's buffers."""
    monkeypatch.setattr(backends, "REQUESTED", requested)
    monkeypatch.setattr(backends, "_CHOSEN", {})
    pre, layer = copy.deepcopy((pre, layer))  # together: CBN keeps its conv
    out = []
    for x in xs:
        pre.zero_grad()
        layer.zero_grad()
        xa = x.clone().requires_grad_()
        z = layer(pre(xa))
        (z * torch.linspace(-1, 2, z.numel(), dtype=z.dtype).view_as(z)).sum().backward()
        out += [z.detach(), xa.grad, layer.weight.grad, layer.bias.grad]
    return out + [b.clone() for b in layer.buffers()]


def mabn():
    layer = MABN2d(4, buffer_size=2, warmup_iters=1, r_warmup_iters=2, activation="elu", activation_param=1.0)
    return torch.nn.Identity(), layer


def cbn():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    return conv, CBN2d(4, window=2, burnin_iters=1, activation="leaky_relu", activation_param=0.1, conv=conv)


@pytest.mark.parametrize("make", [mabn, cbn])
def test_mabn_cbn_equal_their_pytorch_path(make, ops, monkeypatch):
    """MABN (past its warm-up) and CBN (past its burn-in, compensated window in use) over three
    steps on the Triton path equal their PyTorch path (float64)."""
    torch.manual_seed(0)
    pre, layer = make()
    pre, layer = pre.double(), layer.double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    xs = [torch.randn(3, layer.num_features if make is mabn else 3, 3, 5, dtype=torch.float64) * 2 + 1
          for _ in range(3)]
    ref = run_steps(pre, layer, xs, "torch", monkeypatch)
    got = run_steps(pre, layer, xs, "triton", monkeypatch)
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"item {i}")


# --------------------------------------------------------------------------- ahead of time
@pytest.mark.slow
def test_kernels_compile_ahead_of_time():
    """Every kernel body x mode x activation (and each dtype and tile shape) compiles for sm_80,
    sm_90 and gfx942 without a GPU (a process without the interpreter), without spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "abnexp", "kernels", "build", "--backend", "triton",
                           "--arch", "sm_80,sm_90,gfx942"], env=env, capture_output=True, text=True,
                          timeout=1200, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if re.match(r"\w+_kernel\b", line)]
    assert {r[0].split("[")[0] for r in rows} == {"reduce_planes_kernel", "reduce_rows_kernel", "merge_kernel",
                                                   "elementwise_planes_kernel", "elementwise_rows_kernel"}
    assert {r[1] for r in rows} == {"sm_80", "sm_90", "gfx942"}
    assert all(0 < int(r[2]) <= 255 and int(r[3]) == 0 for r in rows), [r for r in rows if len(r) < 5][:3]
    assert f"{len(rows)} of {len(rows)} kernels compiled" in done.stdout
