"""CBN (abnexp.norm.cbn) on the native kernels against its PyTorch path.

The PyTorch path is the reference (tests/norm compare it with BatchNorm and the authors'
formulas); over several iterations with the compensated window in use the native path must give
the same outputs, gradients (of x through the paired conv, of the conv and norm parameters) and
buffers. The two native autograd functions are gradchecked in float64.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from abnexp.norm import backends
from abnexp.norm.cbn import CBN2d, _BatchMoments, _FusedNormalize
from abnexp.commands import kernels as K
from test_kernels import built, spy  # noqa: F401  (fixtures: the module is built; operator counts)

STEPS = 5


def run(pair, xs, enabled, monkeypatch):
    monkeypatch.setattr(backends, "REQUESTED", "auto" if enabled else "torch")
    conv, layer = copy.deepcopy(pair)
    out = []
    for x in xs:
        conv.zero_grad()
        layer.zero_grad()
        xa = x.clone().requires_grad_()
        z = layer(conv(xa))
        (z * torch.linspace(-1, 2, z.numel(), dtype=z.dtype).view_as(z)).sum().backward()
        out += [z.detach(), xa.grad, conv.weight.grad, layer.weight.grad, layer.bias.grad]
    return out + [b.clone() for b in layer.buffers()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("invalid,group_size,act", [("max", 0, "leaky_relu"), ("drop", 2, "elu"),
                                                    ("max", 0, "relu")])
def test_native_equals_pytorch_path(dtype, layout, invalid, group_size, act, monkeypatch, spy):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1).to(dtype)
    layer = CBN2d(5, window=3, burnin_iters=1, invalid_stats=invalid, group_size=group_size, conv=conv,
                  activation=act, activation_param=0.3).to(dtype)
    xs = [torch.randn(4, 3, 5, 6, dtype=dtype) * 2 + 1 for _ in range(STEPS)]
    if layout == "channels_last":
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    pair = (conv, layer)
    ref = run(pair, xs, False, monkeypatch)
    assert not spy.calls
    got = run(pair, xs, True, monkeypatch)
    assert spy.calls["statistics"] and spy.calls["forward"] and spy.calls["xhat_backward_reduce"]
    assert spy.calls["linear_backward_elementwise"]
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(b.double().abs().max().item(), 1.0), msg=f"item {i}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_native_functions_gradcheck(layout):
    x = K.make_input((3, 4, 2, 3), torch.float64, layout, "cpu").requires_grad_()
    assert torch.autograd.gradcheck(lambda x: _BatchMoments.apply(x), (x,))
    g = torch.Generator().manual_seed(2)
    mu, invstd, w, b = (torch.rand(4, generator=g, dtype=torch.float64).add_(0.5).requires_grad_()
                        for _ in range(4))
    for act, param in [("leaky_relu", 0.2), ("elu", 0.7), ("identity", 0.0)]:
        assert torch.autograd.gradcheck(lambda *a: _FusedNormalize.apply(*a, act, param), (x, mu, invstd, w, b))


def test_negative_slope_stays_on_pytorch_path(spy):
    conv = nn.Conv2d(3, 4, 1)
    layer = CBN2d(4, conv=conv, activation="leaky_relu", activation_param=-0.1)
    layer(conv(torch.randn(4, 3, 2, 2))).sum().backward()
    assert not spy.calls
