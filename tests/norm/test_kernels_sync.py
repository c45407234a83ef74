"""The synchronized layers (abnexp.norm.sync) on the native kernels against their PyTorch path.

In-process with a one-rank gloo group the layers take their synchronized code path (the
collectives run, over one rank); the native path must match the PyTorch path in float64 and
float32, both layouts, and gradcheck in float64. The multi-process runs (2 gloo processes under
torchrun, against torch's BatchNorm on the concatenated batch) are in tests/engine/test_distributed.py
and use the native path too.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.func import functional_call

from abnexp.norm import NORM_LAYERS, backends
from abnexp.norm.sync import InPlaceABNSync, SyncABN
from abnexp.commands import kernels as K
from test_kernels import built, spy  # noqa: F401  (fixtures: the module is built; operator counts)

SYNC = ("syncbn", "inplace_abn_sync", "inplace_abn_sync_ii")


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-rank gloo group (file store), destroyed at the end unless one existed before."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    store = tmp_path_factory.mktemp("dist") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def synchronized(monkeypatch, one_rank_group):
    """Make the layers synchronize over the one-rank group (they compute locally otherwise)."""
    for cls in (SyncABN, InPlaceABNSync):
        monkeypatch.setattr(cls, "sync_group", lambda self: one_rank_group if self.training else None)


def make_layer(name, dtype, act="leaky_relu", param=0.2, c=5):
    layer = NORM_LAYERS[name](c, activation=act, activation_param=param).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=g) - 0.3)  # a negative weight: the |w| flip
        layer.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return layer


def step(layer, x, g, enabled, monkeypatch):
    monkeypatch.setattr(backends, "REQUESTED", "auto" if enabled else "torch")
    layer.zero_grad()
    xa = x.clone().requires_grad_()
    z = layer(xa.clone())
    z.backward(g)
    return [z.detach(), xa.grad, layer.weight.grad, layer.bias.grad, layer.running_mean.clone(),
            layer.running_var.clone()]


@pytest.mark.parametrize("name", SYNC)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_native_equals_pytorch_path(name, dtype, layout, synchronized, monkeypatch, spy):
    x = K.make_input((4, 5, 3, 7), dtype, layout, "cpu")
    g = K.make_input((4, 5, 3, 7), dtype, layout, "cpu", seed=5)
    ref = step(make_layer(name, dtype), x, g, False, monkeypatch)
    assert not spy.calls
    got = step(make_layer(name, dtype), x, g, True, monkeypatch)
    backward = "inplace_backward" if name.startswith("inplace") else "xhat_backward"
    assert spy.calls["statistics"] and spy.calls[backward + "_reduce"]
    assert spy.calls[backward + "_elementwise"] + spy.calls[backward + "_elementwise_"]
    assert got[0].stride() == x.stride()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(b.double().abs().max().item(), 1.0), msg=f"item {i}")


@pytest.mark.parametrize("name", SYNC)
@pytest.mark.parametrize("act,param", [("leaky_relu", 0.2), ("elu", 0.7)])
def test_native_gradcheck(name, act, param, synchronized, spy):
    layer = make_layer(name, torch.float64, act, param, c=3)
    x = K.make_input((3, 3, 2, 3), torch.float64, "channels_last", "cpu").requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}

    def fn(x, *ps):
        return functional_call(layer, dict(zip(params, ps)), (x.clone(),))

    assert torch.autograd.gradcheck(fn, (x, *params.values()), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert spy.calls["statistics"] > 0
