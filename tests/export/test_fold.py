"""Folding (abnexp.export.fold): every norm's inference form against its own eval-mode layer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from abnexp.export import ChannelAffine, inference_model
from abnexp.export.fold import is_affine_norm
from abnexp.norm import ABN, NORMS, InPlaceABN, build_norm_act

from export_models import TinyNet, randomize_norms

AFFINE_NORMS = [name for name in NORMS if name != "gn"]


def eval_layer(norm: str) -> nn.Module:
    return randomize_norms(build_norm_act(norm)(32, activation="identity")).eval()


@pytest.mark.parametrize("norm", AFFINE_NORMS)
def test_inference_affine_is_the_eval_layer(norm):
    layer = eval_layer(norm)
    x = torch.randn(3, 32, 5, 4)
    scale, shift = layer.inference_affine()
    assert scale.shape == shift.shape == (32,) and scale.dtype == torch.float64
    with torch.no_grad():
        expected = layer(x.clone())
    got = x.double() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    torch.testing.assert_close(got.float(), expected, atol=1e-5, rtol=1e-5)


def test_inplace_abn_uses_abs_gamma_plus_eps():
    """InPlace-ABN's inference map is torch BatchNorm's with γ = |weight| + ε (paper §3.2)."""
    layer = randomize_norms(InPlaceABN(8, eps=0.1, activation="identity")).eval()
    assert (layer.weight < 0).any()
    bn = nn.BatchNorm2d(8, eps=0.1).eval()
    with torch.no_grad():
        bn.weight.copy_(layer.weight.abs() + 0.1)
        bn.bias.copy_(layer.bias)
        bn.running_mean.copy_(layer.running_mean)
        bn.running_var.copy_(layer.running_var)
    x = torch.randn(2, 8, 3, 3)
    scale, shift = layer.inference_affine()
    with torch.no_grad():
        torch.testing.assert_close((x.double() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).float(), bn(x))


def test_batch_statistics_in_eval_is_refused():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        ABN(8, track_running_stats=False).inference_affine()


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("fold", [True, False])
def test_inference_model_equals_eval_model(norm, fold):
    torch.manual_seed(0)
    model = randomize_norms(TinyNet(norm)).eval()
    inference = inference_model(model, fold=fold)
    x = torch.randn(3, 3, 20, 12)
    with torch.no_grad():
        expected = model(x.clone())
        got = inference(x)
    assert (got - expected).abs().max() <= 1e-5
    assert not any(is_affine_norm(m) for m in inference.modules())
    assert all(type(m) is nn.Conv2d for m in inference.modules() if isinstance(m, nn.Conv2d))  # no CenConv2d
    affines = {name.rsplit(".", 1)[0] for name, m in inference.named_modules() if isinstance(m, ChannelAffine)}
    if norm == "gn":  # GroupNorm stays
        assert not affines and sum(isinstance(m, nn.GroupNorm) for m in inference.modules()) == 4
    elif fold:  # bn1, bn2, bn_down fold into their convs; bn3 follows a sum
        assert affines == {"bn3"}
        assert inference.conv2.bias is not None and inference.down.bias is not None
    else:
        assert affines == {"bn1", "bn2", "bn_down", "bn3"}


def test_model_is_not_modified():
    model = randomize_norms(TinyNet("mabn")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inference_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.bn1).__name__ == "MABN2d"


def test_mabn_folds_the_centred_weight():
    """MABN's CenConv2d applies W - mean(W): the folded conv equals BN(conv(x; W - mean W)) by hand."""
    model = randomize_norms(TinyNet("mabn")).eval()
    inference = inference_model(model)
    w = model.conv2.weight.detach().double()
    w = w - w.mean(dim=(1, 2, 3), keepdim=True)
    bn = model.bn2
    scale = bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()
    torch.testing.assert_close(inference.conv2.weight.double(), w * scale.view(-1, 1, 1, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(inference.conv2.bias.double(),
                               bn.bias.detach().double() - bn.running_mean.double() * scale, atol=1e-6, rtol=1e-6)
