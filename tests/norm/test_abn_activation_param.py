"""``norm=bn`` (ABN, and GroupedABN with ``group_size``) with any LeakyReLU slope / ELU alpha.

A negative slope / alpha runs out of place (torch refuses the in-place backward of those); the
references are autograd of torch's own ``F.batch_norm`` + ``F.leaky_relu`` / ``F.elu`` with the
same parameter. The common case (parameter >= 0) must stay in place: autograd keeps x and the
output, not a separate pre-activation. MABN2d uses the same activation path and is checked
against its identity-activation output followed by torch's out-of-place activation.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abnexp.norm import backends
from abnexp.norm.abn import ABN
from abnexp.norm.grouping import GroupedABN
from abnexp.norm.mabn import MABN2d

D = torch.float64
PARAMS = [("leaky_relu", -0.3), ("leaky_relu", -1.5), ("elu", -0.5), ("leaky_relu", 0.01),
          ("leaky_relu", 0.0), ("elu", 1.0)]


def torch_act(name, y, param):
    return F.leaky_relu(y, param) if name == "leaky_relu" else F.elu(y, param)


def randomize_affine(layer):
    with torch.no_grad():
        layer.weight.copy_(1.0 + 0.5 * torch.randn_like(layer.weight))
        layer.bias.copy_(0.3 * torch.randn_like(layer.bias))
    return layer


@pytest.mark.parametrize("name,param", PARAMS)
@pytest.mark.parametrize("group_size", [0, 2])
def test_abn_matches_torch_batch_norm_and_activation(name, param, group_size):
    torch.manual_seed(5)
    layer = GroupedABN(3, group_size=group_size, activation=name, activation_param=param, dtype=D) \
        if group_size else ABN(3, activation=name, activation_param=param, dtype=D)
    randomize_affine(layer)
    bn = nn.BatchNorm2d(3, dtype=D)
    bn.load_state_dict(layer.state_dict())
    for _ in range(2):  # training (running statistics advance), then again from the new state
        x = torch.randn(6, 3, 3, 3, dtype=D).requires_grad_()
        x_before = x.detach().clone()
        dy = torch.randn(6, 3, 3, 3, dtype=D)
        y = layer(x)
        grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
        chunks = x.split(group_size) if group_size else (x,)
        y_ref = torch.cat([torch_act(name, bn(c), param) for c in chunks])
        grads_ref = torch.autograd.grad(y_ref, (x, bn.weight, bn.bias), dy)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.equal(x.detach(), x_before)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(layer, key), getattr(bn, key), rtol=1e-12, atol=1e-12)
    layer.eval()
    bn.eval()
    x = torch.randn(4, 3, 3, 3, dtype=D).requires_grad_()
    dy = torch.randn(4, 3, 3, 3, dtype=D)
    y, y_ref = layer(x), torch_act(name, bn(x), param)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y_ref, x, dy)[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,param", [("leaky_relu", 0.01), ("elu", 1.0)])
@pytest.mark.parametrize("use_native", [True, False])
def test_non_negative_parameter_still_runs_in_place(name, param, use_native, monkeypatch):
    """Autograd keeps x (for BN) and the output z (for phi), no separate pre-activation, with
    the native kernels and on the PyTorch path."""
    monkeypatch.setattr(backends, "REQUESTED", "auto" if use_native else "torch")
    layer = ABN(3, activation=name, activation_param=param, dtype=D)
    x = torch.randn(4, 3, 3, 3, dtype=D, requires_grad=True)
    saved = []

    def pack(t):
        if t.shape == x.shape:
            saved.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert sorted(saved) == sorted([x.data_ptr(), y.data_ptr()])


@pytest.mark.parametrize("name,param", [("leaky_relu", -0.3), ("elu", -0.5)])
@pytest.mark.parametrize("group_size", [0, 2])
def test_mabn_negative_parameter_matches_identity_then_torch_activation(name, param, group_size):
    torch.manual_seed(6)
    kw = dict(buffer_size=2, warmup_iters=1, r_warmup_iters=2, group_size=group_size, dtype=D)
    layer = randomize_affine(MABN2d(3, activation=name, activation_param=param, **kw))
    ref = MABN2d(3, activation="identity", **kw)
    ref.load_state_dict(layer.state_dict())
    for _ in range(4):  # through warm-up into the moving averages
        x = torch.randn(4, 3, 3, 3, dtype=D).requires_grad_()
        dy = torch.randn(4, 3, 3, 3, dtype=D)
        y = layer(x)
        dx = torch.autograd.grad(y, x, dy)[0]
        y_ref = torch_act(name, ref(x), param)
        dx_ref = torch.autograd.grad(y_ref, x, dy)[0]
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["brn", "cbn", "gn", "frozen_bn"])  # syncbn: refused (check_output_form)
@pytest.mark.parametrize("act, param", [("leaky_relu", -0.3), ("elu", -0.5)])
def test_every_autograd_norm_takes_a_negative_parameter(name, act, param):
    """The layer with φ = identity, then torch's own (out-of-place) φ: same output and gradients."""
    import warnings

    from abnexp.norm import build_norm_act

    torch.manual_seed(0)
    x = torch.randn(4, 32, 5, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CBN without a paired conv, sync layers without a group
        layer = build_norm_act(name, activation=act, activation_param=param)(32).double()
        plain = build_norm_act(name, activation="identity")(32).double()
    plain.load_state_dict(layer.state_dict())
    phi = (lambda y: F.leaky_relu(y, param)) if act == "leaky_relu" else (lambda y: F.elu(y, param))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(xa)
    ref = phi(plain(xb))
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(xa.grad, xb.grad)
