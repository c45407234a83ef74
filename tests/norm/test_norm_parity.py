"""Float32 / AMP parity of every strategy with torch.nn.BatchNorm{1,2,3}d + activation, and
``abnexp.norm.convert``.

In-place layers apply the documented effective scale |weight| + eps, so their reference
BatchNorm gets weight + eps (positive weights); everything else is compared as is.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from abnexp.norm import NORM_LAYERS, build_norm_act, convert, make_activation
from abnexp.norm.base import NormActBase
from conftest import STRATEGIES

ROOT = Path(__file__).resolve().parents[2]
BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = [(2, 3), (1, 3, 2), (2, 5, 7), (1, 6, 1, 2), (4, 8, 5, 5), (3, 6, 2, 3, 4),
          (8, 16, 28, 28), (16, 32, 6, 7)]
RTOL, ATOL = 1e-4, 1e-5


def pair(name, shape, act="leaky_relu", param=0.01, momentum=0.1, seed=0, **kw):
    """(layer under test, reference BN, reference activation) with equal random params."""
    c = shape[1]
    g = torch.Generator().manual_seed(seed)
    layer = NORM_LAYERS[name](c, momentum=momentum, activation=act, activation_param=param,
                              **kw)
    bn = BN[len(shape)](c, momentum=momentum, **kw)
    if layer.affine:
        with torch.no_grad():
            w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.3
            layer.weight.copy_(w)
            layer.bias.copy_(b)
            bn.weight.copy_(w + (layer.eps if layer.inplace else 0.0))
            bn.bias.copy_(b)
    return layer, bn, make_activation(act, param)


def close(a, b, what, scale=1.0):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * scale, msg=lambda m: f"{what}: {m}")


def check_step(layer, bn, act, x, seed):
    """One forward/backward of both with the same input and grad_output; compares all."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(xa.clone() if layer.inplace else xa)
    ref = act(bn(xb))
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed)).to(
        memory_format=torch.channels_last if x.dim() == 4 and
        x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    out.backward(g)
    ref.backward(g)
    close(out, ref, "output")
    # dL/dx is a difference of terms of size |g| * gamma / sigma_B (it cancels to ~0 for
    # two values per channel): the absolute tolerance is relative to that size
    dims = [0] + list(range(2, x.dim()))
    sigma = x.double().var(dim=dims, unbiased=False).add(bn.eps).sqrt().min().item()
    gamma = bn.weight.abs().max().item() if bn.affine else 1.0
    close(xa.grad, xb.grad, "dL/dx", scale=g.abs().max().item() * gamma / sigma)
    if layer.affine:
        close(layer.weight.grad, bn.weight.grad, "dL/dweight", scale=bn.weight.grad.abs().max().item())
        close(layer.bias.grad, bn.bias.grad, "dL/dbias", scale=bn.bias.grad.abs().max().item())
        layer.zero_grad(), bn.zero_grad()
    return out


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("shape,channels_last",
                         [(s, False) for s in SHAPES] + [(s, True) for s in SHAPES if len(s) >= 4])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_parity_with_torch_batchnorm(name, shape, channels_last, momentum):
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    layer, bn, act = pair(name, shape, momentum=momentum, seed=len(shape))
    for i in range(3):  # training steps, running statistics accumulate
        x = torch.randn(shape, generator=torch.Generator().manual_seed(10 + i)) * 2 + 0.5
        if channels_last:
            x = x.to(memory_format=fmt)
        out = check_step(layer, bn, act, x, seed=i)
        if channels_last:
            assert out.is_contiguous(memory_format=fmt)
        close(layer.running_mean, bn.running_mean, "running_mean")
        close(layer.running_var, bn.running_var, "running_var")
        assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == i + 1
    layer.eval(), bn.eval()
    out = check_step(layer, bn, act, x, seed=7)
    if channels_last:
        assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("act,param", [("elu", 1.0), ("identity", 0.0), ("leaky_relu", 0.2)])
@pytest.mark.parametrize("kw", [{"affine": False}, {"track_running_stats": False}])
def test_parity_options(name, act, param, kw):
    layer, bn, a = pair(name, (4, 6, 5, 5), act=act, param=param, **kw)
    x = torch.randn(4, 6, 5, 5) * 3 - 1
    check_step(layer, bn, a, x, seed=0)
    layer.eval(), bn.eval()
    check_step(layer, bn, a, x, seed=1)


@pytest.mark.parametrize("name", [n for n in STRATEGIES if not n.startswith("inplace")])
def test_parity_relu(name):
    layer, bn, act = pair(name, (4, 6, 5, 5), act="relu", param=0.0)
    check_step(layer, bn, act, torch.randn(4, 6, 5, 5), seed=0)


AMP_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("dtype", AMP_DTYPES)
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precision(name, dtype, autocast, channels_last):
    """Half inputs, float32 parameters/statistics: compared with float32 BatchNorm."""
    shape = (4, 8, 6, 6)
    layer, bn, act = pair(name, shape, act="leaky_relu", param=0.1)
    x32 = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 2 + 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x32.to(dtype).to(memory_format=fmt)
    xa = x.clone().requires_grad_()
    xb = x.float().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        out = layer(xa.clone() if layer.inplace else xa)
    ref = act(bn(xb))
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    out.backward(g.to(dtype))
    ref.backward(g)
    assert xa.grad.dtype == dtype
    assert layer.weight.grad.dtype == torch.float32 and layer.running_mean.dtype == torch.float32
    assert layer.running_var.dtype == torch.float32 and layer.weight.dtype == torch.float32
    tol = dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(out.float(), ref, **tol)
    torch.testing.assert_close(xa.grad.float(), xb.grad, **tol)
    torch.testing.assert_close(layer.weight.grad, bn.weight.grad, rtol=0.02, atol=0.2)
    torch.testing.assert_close(layer.bias.grad, bn.bias.grad, rtol=0.02, atol=0.2)
    torch.testing.assert_close(layer.running_mean, bn.running_mean, rtol=0.01, atol=0.01)
    torch.testing.assert_close(layer.running_var, bn.running_var, rtol=0.01, atol=0.01)


# ----------------------------------------------------------------------------- convert
def small_model(act="leaky_relu", param=0.01):
    na = build_norm_act("bn", activation=act, activation_param=param)
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), na(8), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Sequential(na(8, activation="elu", activation_param=1.0)),
                         nn.Conv2d(8, 4, 1), na(4, activation="identity"))


def train_a_bit(model):
    model.train()
    for i in range(3):
        model(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i))).sum().backward()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NormActBase):
                m.weight.uniform_(0.3, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def norm_layers(model):
    return [m for m in model.modules() if isinstance(m, NormActBase)]


@pytest.mark.parametrize("target", ["inplace_abn", "inplace_abn_ii", "checkpoint",
                                    "checkpoint_proposed"])
def test_convert_roundtrip_preserves_outputs(target):
    model = train_a_bit(small_model())
    x = torch.randn(2, 3, 8, 8)
    params0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x.clone())
    converted = convert(model, to=target)
    assert converted is model
    assert all(type(m) is type(NORM_LAYERS[target](1)) for m in norm_layers(model))
    assert len(norm_layers(model)) == 3 and not model.training
    assert [m.activation for m in norm_layers(model)] == ["leaky_relu", "elu", "identity"]
    with torch.no_grad():
        torch.testing.assert_close(model(x.clone()), ref, rtol=1e-5, atol=1e-5)
    convert(model, to="bn")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, params0[k], rtol=1e-6, atol=1e-6, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(model(x.clone()), ref, rtol=1e-5, atol=1e-5)


def test_convert_negative_gamma_and_non_invertible():
    model = train_a_bit(small_model())
    with torch.no_grad():
        model[1].weight[:2] *= -1
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    with pytest.raises(ValueError, match=r"'1': 2 of 8 channels have weight < 0"):
        convert(model, to="inplace_abn")
    assert all(type(m).__name__ == "ABN" for m in norm_layers(model))  # nothing changed
    with pytest.warns(UserWarning, match=r"'1': 2 of 8 channels have weight < 0"):
        convert(model, to="inplace_abn", negative_gamma="abs")
    with torch.no_grad():
        out = model(x.clone())
    assert not torch.allclose(out, ref, atol=1e-3)  # documented: the function changes
    # ... exactly as if the BN weights had been |weight|
    model_abs = train_a_bit(small_model())
    with torch.no_grad():
        for m, n in zip(norm_layers(model_abs), norm_layers(model)):
            m.weight.copy_(n.weight.abs() + n.eps)
            m.bias.copy_(n.bias)
        torch.testing.assert_close(model_abs(x.clone()), out, rtol=1e-5, atol=1e-5)
    # in-place layers with negative weights convert back to BN exactly (|w| + eps)
    with torch.no_grad():
        norm_layers(model)[0].weight[3] = -0.7
        ref2 = model(x.clone())
    convert(model, to="bn")
    with torch.no_grad():
        torch.testing.assert_close(model(x.clone()), ref2, rtol=1e-5, atol=1e-5)
    relu_model = small_model(act="relu")
    with pytest.raises(ValueError, match=r"'1' uses activation='relu'.*not invertible"):
        convert(relu_model, to="inplace_abn_ii")
    single = convert(NORM_LAYERS["inplace_abn"](4), to="bn")
    assert type(single).__name__ == "ABN"
    with pytest.raises(ValueError, match="unknown norm"):
        convert(relu_model, to="groupnorm")


def test_convert_inplace_model_trains():
    model = train_a_bit(small_model())
    convert(model, to="inplace_abn").train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(4, 3, 8, 8)).sum().backward()
    assert all(m.weight.grad is not None for m in norm_layers(model))


@pytest.mark.parametrize("name", STRATEGIES)
def test_norm_configs(name):
    path = ROOT / "configs" / "norm" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#")
    cfg = yaml.safe_load(text)
    assert cfg.pop("defaults") == [f"/schema/norm/{name}@_here_", "_self_"]  # typed by the option's schema
    assert set(cfg) == {"name", "activation", "activation_param", "eps", "momentum"}
    assert cfg["name"] == name and isinstance(cfg["eps"], float)
    layer = build_norm_act(**cfg)(8)
    assert getattr(layer, "inplace", False) is name.startswith("inplace")
