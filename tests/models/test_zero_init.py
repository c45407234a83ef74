"""model.zero_init_residual: γ = 0 in the last norm of every residual branch (torchvision's rule)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from abnexp.config import compose
from abnexp.errors import ConfigError
from abnexp.models import build_model
from abnexp.models.blocks import IdentityResidualBlock
from abnexp.norm import build_norm_act
from abnexp.tasks import build_task


def zero_weights(model: nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if k.endswith(".weight") and v.ndim == 1 and not v.any()}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_the_same_weights_as_torchvisions_zero_init_residual(name):
    ours = build_model(name, build_norm_act("bn", activation="relu"), 10, zero_init_residual=True)
    theirs = getattr(torchvision.models, name)(num_classes=10, zero_init_residual=True)
    assert zero_weights(ours) == zero_weights(theirs) and zero_weights(theirs)
    assert not zero_weights(build_model(name, build_norm_act("bn", activation="relu"), 10))


@pytest.mark.parametrize("norm", ["bn", "gn", "mabn", "brn", "checkpoint"])
@pytest.mark.parametrize("name", ["resnext50", "wideresnet38"])
def test_each_preactivation_block_starts_as_its_shortcut(name, norm):
    torch.manual_seed(0)
    model = build_model(name, build_norm_act(norm), 10, zero_init_residual=True).train()
    blocks = [m for m in model.modules() if isinstance(m, IdentityResidualBlock)][:3]
    for block in blocks:
        x = torch.randn(2, block.convs.conv1.in_channels, 8, 8)
        with torch.no_grad():
            shortcut = x if block.proj_conv is None else block.proj_conv(block.bn1(x.clone()))
            out = block(x.clone())
        assert torch.allclose(out, shortcut, atol=1e-6), name


@pytest.mark.parametrize("norm, reason", [("inplace_abn", "in-place strategies scale by"),
                                          ("inplace_abn_ii", "in-place strategies scale by"),
                                          ("frozen_bn", "no learnable γ")])
def test_norms_whose_gamma_cannot_be_zero_are_refused(norm, reason):
    with pytest.raises(ValueError, match=reason):
        build_model("resnet18", build_norm_act(norm), 10, zero_init_residual=True)
    with pytest.raises(ConfigError, match="model.zero_init_residual=true"):
        build_task(compose([f"norm={norm}", "model.zero_init_residual=true"])).build_model()


def test_the_config_key_reaches_every_task():
    for overrides in (["model=resnet18"], ["task=semseg", "model=resnext50"], ["task=detection"]):
        model = build_task(compose([*overrides, "model.zero_init_residual=true", "norm=gn"])).build_model()
        assert zero_weights(model), overrides
