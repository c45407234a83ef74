"""``model.stem`` of the ResNets (abnexp.models.resnet.STEMS): the default is torchvision's stem
unchanged; ``small`` / ``small_pool`` against torchvision's ResNet with the usual CIFAR adaptation
(conv1 = 3x3 stride 1, max-pool removed or kept) and hand-computed feature-map sizes."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from abnexp.config import compose
from abnexp.errors import ConfigError
from abnexp.models import build_model, model_options
from abnexp.norm import build_norm_act


def _cifar_torchvision(max_pool: bool) -> nn.Module:
    """torchvision's ResNet-18 (10 classes) with conv1 = 3x3 stride 1 padding 1 and, unless
    ``max_pool``, no max-pool: the common CIFAR adaptation, written independently of abnexp."""
    tv = torchvision.models.resnet18(weights=None, num_classes=10)
    tv.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    if not max_pool:
        tv.maxpool = nn.Identity()
    return tv


@pytest.mark.parametrize("stem, max_pool", [("small", False), ("small_pool", True)])
def test_small_stems_match_torchvision_with_the_cifar_stem(stem, max_pool):
    torch.manual_seed(0)
    tv = _cifar_torchvision(max_pool).eval()
    ours = build_model("resnet18", build_norm_act("bn", activation="relu"), num_classes=10, stem=stem).eval()
    assert tuple(ours.conv1.weight.shape) == (64, 3, 3, 3)
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5, rtol=1e-4)


def test_default_stem_is_torchvisions():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    default = build_model("resnet18", build_norm_act("bn", activation="relu"), num_classes=10).eval()
    assert tuple(default.conv1.weight.shape) == (64, 3, 7, 7) and default.conv1.stride == (2, 2)
    default.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(default(x), tv(x))
    assert compose([]).model.stem == "imagenet"


# Hand-computed map sides (28 px input): imagenet 28 -conv/2-> 14 -pool/2-> 7 (layer1), 4, 2, 1;
# small keeps 28 in layer1, then 14, 7, 4 (ceil); small_pool halves once: 14, 7, 4, 2.
SIDES = {"imagenet": [14, 7, 7, 4, 2, 1], "small": [28, 28, 28, 14, 7, 4], "small_pool": [28, 14, 14, 7, 4, 2]}


@pytest.mark.parametrize("stem", list(SIDES))
def test_feature_map_sides_at_28_pixels(stem):
    model = build_model("resnet18", build_norm_act("bn"), num_classes=10, stem=stem).eval()
    sides = []
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o: sides.append(o.shape[-1]))
             for n in ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4")]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 28, 28)).shape == (1, 10)
    for h in hooks:
        h.remove()
    assert sides == SIDES[stem]
    # declared stage strides: layer1 of a 64 px input is 64 / stride pixels wide
    declared = [s.stride for s in model.feature_stages()]
    assert declared == {"imagenet": [4, 8, 16, 32], "small": [1, 2, 4, 8], "small_pool": [2, 4, 8, 16]}[stem]


def test_stem_is_a_config_key_of_the_resnets_only():
    cfg = compose(["model.stem=small"])
    assert model_options(cfg.model)["stem"] == "small"
    with pytest.raises(ConfigError, match=r"expected one of \[imagenet, small, small_pool\]"):
        compose(["model.stem=tiny"])
    with pytest.raises(ConfigError, match="no such config key"):
        compose(["model=resnext50", "model.stem=small"])
    with pytest.raises(ValueError, match="model.stem='tiny' is not a stem; valid: imagenet, small, small_pool"):
        build_model("resnet18", build_norm_act("bn"), num_classes=10, stem="tiny")
