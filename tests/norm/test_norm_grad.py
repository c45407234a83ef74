"""Gradient correctness of the BN + activation strategies (abnexp.norm).

References are independent of the code under test: finite differences (float64
``torch.autograd.gradcheck``), ``torch.nn.BatchNorm2d`` + torch activations with autograd,
and hand-computed values.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from abnexp.norm import (ABN, NORM_LAYERS, CheckpointedABN, InPlaceABN, build_norm_act,
                         is_invertible, make_activation)
from abnexp.norm.activations import ACTIVATIONS
from conftest import STRATEGIES

INPLACE = ("inplace_abn", "inplace_abn_ii")
ACTS = {  # activations each strategy accepts: (name, param)
    "bn": [("leaky_relu", 0.01), ("leaky_relu", 0.3), ("elu", 0.7), ("relu", 0.0),
           ("identity", 0.0)],
    "checkpoint": [("leaky_relu", 0.3), ("elu", 0.7), ("relu", 0.0), ("identity", 0.0)],
    "checkpoint_proposed": [("leaky_relu", 0.3), ("elu", 0.7), ("relu", 0.0),
                            ("identity", 0.0)],
    "inplace_abn": [("leaky_relu", 0.01), ("leaky_relu", 0.3), ("elu", 0.7), ("identity", 0.0)],
    "inplace_abn_ii": [("leaky_relu", 0.01), ("leaky_relu", 0.3), ("elu", 0.7),
                       ("identity", 0.0)],
}
CASES = [(n, a, p) for n, acts in ACTS.items() for a, p in acts]


def make_layer(name, act, param, c=4, weight=None, **kw):
    layer = NORM_LAYERS[name](c, activation=act, activation_param=param, **kw).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if layer.affine:
            layer.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5
                               if weight is None else torch.tensor(weight, dtype=torch.float64))
            layer.bias.copy_(torch.rand(c, generator=g, dtype=torch.float64) - 0.5)
        if layer.track_running_stats:
            layer.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    return layer


def run_gradcheck(layer, shape=(3, 4, 2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}
    names = list(params)

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x.clone(),))

    assert torch.autograd.gradcheck(fn, (x, *params.values()), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,act,param", CASES)
@pytest.mark.parametrize("mode", ["train", "eval", "eval_batch_stats"])
def test_gradcheck(name, act, param, mode):
    layer = make_layer(name, act, param, track_running_stats=(mode != "eval_batch_stats"))
    layer.train(mode == "train")
    run_gradcheck(layer)


@pytest.mark.parametrize("name", INPLACE)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("act,param", [("leaky_relu", 0.2), ("elu", 1.0)])
def test_gradcheck_negative_gamma(name, mode, act, param):
    layer = make_layer(name, act, param, weight=[-0.8, 1.2, -0.05, 0.9])
    layer.train(mode == "train")
    run_gradcheck(layer, seed=3)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("shape", [(5, 4), (2, 4, 3), (2, 4, 2, 2, 2)])
def test_gradcheck_other_ranks_and_non_affine(name, shape):
    run_gradcheck(make_layer(name, "leaky_relu", 0.2), shape=shape)
    run_gradcheck(make_layer(name, "leaky_relu", 0.2, affine=False), shape=shape)


def bn_reference(layer, x, weight_offset=0.0):
    """torch.nn.BatchNorm2d + activation with the layer's parameters (float64)."""
    bn = torch.nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum,
                              affine=layer.affine).double()
    bn.load_state_dict(layer.state_dict())
    if layer.affine:
        with torch.no_grad():
            bn.weight.add_(weight_offset)
    bn.train(layer.training)
    return bn, make_activation(layer.activation, layer.activation_param)


@pytest.mark.parametrize("name", STRATEGIES)
def test_expanded_grad_output_not_written(name):
    """Loss out.sum() hands an expanded (stride-0) gradient: gradients must be right and
    the incoming grad_output untouched (reference-library bug #155)."""
    layer = make_layer(name, "leaky_relu", 0.1)
    bn, act = bn_reference(layer, None, layer.eps if layer.inplace else 0.0)
    x = torch.randn(4, 4, 3, 3, dtype=torch.float64) + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(xa.clone()).sum().backward()
    act(bn(xb)).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(layer.weight.grad, bn.weight.grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(layer.bias.grad, bn.bias.grad, rtol=1e-7, atol=1e-9)
    # an explicit grad_output must come back unmodified
    layer.zero_grad()
    xc = x.clone().requires_grad_()
    out = layer(xc.clone())
    dz = torch.randn_like(out)
    dz_copy = dz.clone()
    out.backward(dz)
    assert torch.equal(dz, dz_copy)
    base = torch.ones(1, dtype=torch.float64)
    out = layer(x.clone().requires_grad_().clone())
    out.backward(base.expand_as(out))
    assert torch.equal(base, torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("name", INPLACE)
def test_inplace_writes_into_input_and_keeps_autograd_safety(name):
    layer = NORM_LAYERS[name](4)
    # output is the input's storage
    x = torch.randn(2, 4, 3, 3)
    out = layer(x)
    assert out.data_ptr() == x.data_ptr()
    # a leaf requiring grad cannot be overwritten
    leaf = torch.randn(2, 4, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        layer(leaf)
    # a tensor another op saved for backward -> autograd's in-place error at backward
    conv = torch.nn.Conv2d(4, 4, 1)
    inp = torch.randn(2, 4, 3, 3)
    for other in (torch.sin, lambda t: t * torch.ones(1, requires_grad=True),
                  torch.nn.Conv2d(4, 4, 1)):
        y = conv(inp)
        kept = other(y)
        out = layer(y)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (kept.sum() + out.sum()).backward()


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1), (1, 4, 1, 1, 1)])
def test_single_value_per_channel_raises_like_torch(name, shape):
    with pytest.raises(ValueError) as torch_err:
        torch.nn.BatchNorm1d(4).train()(torch.randn(shape)) if len(shape) < 4 else \
            F.batch_norm(torch.randn(shape), None, None, training=True)
    layer = NORM_LAYERS[name](4).train()
    with pytest.raises(ValueError) as err:
        layer(torch.randn(shape))
    assert str(err.value) == f"{type(layer).__name__}(4): {torch_err.value}"  # torch's text, naming the layer
    assert "Expected more than 1 value per channel when training" in str(err.value)
    layer.eval()  # running statistics: fine with a single value
    assert layer(torch.randn(shape)).shape == shape
    no_stats = NORM_LAYERS[name](4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        no_stats(torch.randn(shape))


@pytest.mark.parametrize("cls", [InPlaceABN])
@pytest.mark.parametrize("variant", ["I", "II"])
@pytest.mark.parametrize("act,param", [("relu", 0.0), ("leaky_relu", 0.0), ("elu", 0.0),
                                       ("leaky_relu", -0.1)])
def test_inplace_rejects_non_invertible(cls, variant, act, param):
    with pytest.raises(ValueError, match="not invertible") as err:
        cls(8, activation=act, activation_param=param, variant=variant)
    assert "leaky_relu" in str(err.value) and "ABN" in str(err.value)


def test_factory_errors_and_flags():
    for name in INPLACE:
        with pytest.raises(ValueError, match="not invertible"):
            build_norm_act(name, activation="relu")
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'.*inplace_abn_ii"):
        build_norm_act("batchnorm")
    with pytest.raises(ValueError, match="unknown activation 'gelu'.*leaky_relu"):
        build_norm_act("bn", activation="gelu")
    with pytest.raises(ValueError, match="unknown activation 'swish'.*elu"):
        make_activation("swish", 0.0)
    assert build_norm_act("bn", activation="relu")(8).activation == "relu"
    for name in ("bn", "checkpoint", "checkpoint_proposed", *INPLACE):  # the paper's five strategies
        layer = build_norm_act(name, eps=1e-3, momentum=None)(8)
        assert getattr(layer, "inplace", None) is (name in INPLACE)
        assert layer.eps == 1e-3 and layer.momentum is None
        assert build_norm_act(name)(8, activation="identity").activation == "identity"
    assert isinstance(NORM_LAYERS["bn"](3), ABN)
    assert NORM_LAYERS["checkpoint_proposed"](3).variant == "proposed"
    assert NORM_LAYERS["inplace_abn_ii"](3).variant == "II"
    assert isinstance(NORM_LAYERS["checkpoint"](3), CheckpointedABN)
    assert not is_invertible("relu", 0.0) and is_invertible("elu", 1.0)
    assert not is_invertible("leaky_relu", 0.0) and is_invertible("leaky_relu", 0.01)


@pytest.mark.parametrize("act,param", [("leaky_relu", 0.01), ("leaky_relu", 0.3), ("elu", 1.0),
                                       ("elu", 0.5), ("relu", 0.0), ("identity", 0.0)])
def test_activation_table_matches_torch(act, param):
    fns = ACTIVATIONS[act]
    y = torch.linspace(-6, 6, 121, dtype=torch.float64).requires_grad_()
    z_ref = make_activation(act, param)(y)
    dz = torch.randn_like(z_ref)
    (dy_ref,) = torch.autograd.grad(z_ref, y, dz)
    z = fns.forward_(y.detach().clone(), param)
    torch.testing.assert_close(z, z_ref.detach())
    torch.testing.assert_close(fns.backward(z, dz, param), dy_ref)
    if fns.inverse is not None:
        torch.testing.assert_close(fns.inverse(z, param), y.detach())


def test_hand_computed_values():
    """Two values per channel: x = [1, 3] -> mean 2, var 1, xhat = -+1/sqrt(1+eps)."""
    eps = 1e-5
    xhat = 1 / (1 + eps) ** 0.5
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)  # (N=2, C=1)
    # gamma=2, beta=0.5: y = [0.5 - 2 xhat, 0.5 + 2 xhat]; leaky 0.1
    y = torch.tensor([0.5 - 2 * xhat, 0.5 + 2 * xhat], dtype=torch.float64)
    expected = torch.where(y > 0, y, 0.1 * y)
    for name in STRATEGIES:
        layer = NORM_LAYERS[name](1, activation="leaky_relu", activation_param=0.1).double()
        with torch.no_grad():
            layer.weight.fill_(2.0 - (eps if layer.inplace else 0.0))
            layer.bias.fill_(0.5)
        out = layer(x.clone())
        torch.testing.assert_close(out.flatten(), expected)
        # running stats: mean 0.9*0 + 0.1*2, var 0.9*1 + 0.1*(unbiased 2)
        torch.testing.assert_close(layer.running_mean, torch.tensor([0.2], dtype=torch.float64))
        torch.testing.assert_close(layer.running_var, torch.tensor([1.1], dtype=torch.float64))
        assert int(layer.num_batches_tracked) == 1
