"""MABN (abnexp.norm.mabn) on the native kernels against its PyTorch path.

The PyTorch path is the reference (tests/norm compare it with the authors' code); the native
path must give the same outputs, gradients and buffers over several iterations (warm-up, the
moving averages, r != 1, normalization groups), in float64 and float32, contiguous and
channels-last. In the warm-up MABN's backward is the exact gradient of its forward, which
gradcheck verifies in float64 on the native path.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from abnexp.norm import backends
from abnexp.norm.mabn import MABN2d
from test_kernels import built, spy  # noqa: F401  (fixtures: the module is built; operator counts)

STEPS = 6


def run(layer, xs, enabled, monkeypatch):
    """Outputs, dL/dx, dL/dweight, dL/dbias of each step, then the buffers."""
    monkeypatch.setattr(backends, "REQUESTED", "auto" if enabled else "torch")
    layer = copy.deepcopy(layer)
    out = []
    for x in xs:
        layer.zero_grad()
        xa = x.clone().requires_grad_()
        z = layer(xa)
        assert z.is_contiguous(memory_format=torch.channels_last) == (x.stride(1) == 1)
        (z * torch.linspace(-1, 2, z.numel(), dtype=z.dtype).view_as(z)).sum().backward()
        out += [z.detach(), xa.grad, layer.weight.grad, layer.bias.grad]
    return out + [b.clone() for b in layer.buffers()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("group_size,act", [(0, "leaky_relu"), (2, "elu"), (0, "relu")])
def test_native_equals_pytorch_path(dtype, layout, group_size, act, monkeypatch, spy):
    torch.manual_seed(0)
    layer = MABN2d(6, buffer_size=2, warmup_iters=2, r_warmup_iters=3, group_size=group_size,
                   activation=act, activation_param=0.3).to(dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    xs = [torch.randn(4, 6, 5, 3, dtype=dtype) * 2 + 1 for _ in range(STEPS)]
    if layout == "channels_last":
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    ref = run(layer, xs, False, monkeypatch)
    assert not spy.calls
    got = run(layer, xs, True, monkeypatch)
    assert spy.calls["forward"] and spy.calls["linear_backward_reduce"] and spy.calls["linear_backward_elementwise"]
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(b.double().abs().max().item(), 1.0), msg=f"item {i}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_native_gradcheck_in_warmup(layout, spy):
    """Warm-up (batch statistics, r = 1): dL/dx, dL/dweight, dL/dbias are the true gradients."""
    layer = MABN2d(3, warmup_iters=10**6, r_warmup_iters=10**6, activation="leaky_relu",
                   activation_param=0.2).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 2, 3, generator=g, dtype=torch.float64) + 0.5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    params = {k: (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
              for k, _ in layer.named_parameters()}

    def fn(x, *ps):
        return functional_call(layer, dict(zip(params, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *params.values()), eps=1e-6, atol=1e-6)
    assert spy.calls["linear_backward_elementwise"] > 0


def test_negative_slope_stays_on_pytorch_path(spy):
    layer = MABN2d(3, activation="leaky_relu", activation_param=-0.1)
    layer(torch.randn(4, 3, 2, 2, requires_grad=True)).sum().backward()
    assert not spy.calls
