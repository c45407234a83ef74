"""torchvision's and timm's ResNet weights from a local file (``model.pretrained=PATH``): built
without downloading (random weights, random BN statistics), saved as state dicts, loaded into
abnexp's ResNets with ReLU, outputs compared in eval against the library's own model."""
from __future__ import annotations

import pytest
import torch
import torchvision

from abnexp.config import compose
from abnexp.models import build_model
from abnexp.models.pretrained import load_backbone, load_weights
from abnexp.models.reference_weights import read_weights
from abnexp.norm import build_norm_act

timm = pytest.importorskip("timm")


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BN statistics and affine (a fresh model's are 0 / 1), eval mode."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval()


def relu_model(name: str) -> torch.nn.Module:
    torch.manual_seed(9)
    return build_model(name, build_norm_act("bn", activation="relu"), num_classes=1000).eval()


def saved(model: torch.nn.Module, path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


def test_torchvision_state_dict(tmp_path):
    theirs = randomized(torchvision.models.resnet18(weights=None), 0)
    path = saved(theirs, tmp_path / "resnet18.pth")
    weights = read_weights(path)
    assert weights.source == "state_dict" and not weights.inplace_scale and weights.model is None
    ours = relu_model("resnet18")
    ours.load_state_dict(weights.state, strict=True)  # already strict-loadable, names unchanged
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(image)  # float32 rounding relative to the logits' size (the native kernels fuse the BN arithmetic)
        torch.testing.assert_close(ours(image), expected, rtol=1e-4, atol=1e-5 * max(1.0, expected.abs().max().item()))
    backbone = relu_model("resnet18")
    report = load_backbone(backbone, path, strict=True, expected_model="resnet18")
    assert report["missing"] == [] and report["unexpected"] == [] and report["dropped_head"] == ["fc.bias", "fc.weight"]
    body = torch.nn.Sequential(*list(theirs.children())[:-2])  # up to layer4
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval().forward_features(image), body(image), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_resnet_state_dict(tmp_path, name):
    theirs = randomized(timm.create_model(name, pretrained=False), 1)
    path = saved(theirs, tmp_path / f"{name}.pth")
    ours = relu_model(name)
    load_weights(ours, read_weights(path), path)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(image)  # float32 rounding relative to the logits' size (the native kernels fuse the BN arithmetic)
        torch.testing.assert_close(ours(image), expected, rtol=1e-4, atol=1e-5 * max(1.0, expected.abs().max().item()))


def test_timm_weights_through_model_pretrained(tmp_path):
    """task=semseg with model.pretrained=<timm file>: DeepLabV3's backbone holds timm's tensors."""
    from abnexp.tasks import build_task

    theirs = randomized(timm.create_model("resnet18", pretrained=False), 2)
    path = saved(theirs, tmp_path / "timm_resnet18.pth")
    cfg = compose(["task=semseg", "model=resnet18", "norm.activation=relu", f"model.pretrained={path}"])
    model = build_task(cfg).build_model()
    own = model.backbone.state_dict()
    for k, v in theirs.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v), k


def test_timm_resnet_d_does_not_match(tmp_path):
    """timm's ResNet-D (deep stem, average-pool shortcut) is another architecture: refused by name."""
    path = saved(timm.create_model("resnet18d", pretrained=False), tmp_path / "resnet18d.pth")
    with pytest.raises(ValueError, match="shapes differ|does not match|none of its"):
        load_backbone(relu_model("resnet18"), path, strict=True, expected_model="resnet18")
