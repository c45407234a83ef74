"""load_backbone on real small checkpoints written with torch.save: what is copied (compared tensor by
tensor with the saved state), the head dropped, strict vs logged key mismatches, and the errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from abnexp.models import build_model
from abnexp.models.pretrained import load_backbone
from abnexp.norm import ABN, FrozenBatchNorm2d, build_norm_act

HEAD = ["fc.bias", "fc.weight"]


def save(path, model_name: str, state: dict) -> str:
    """An `abnexp train`-style checkpoint: the state dict and a config naming the model."""
    torch.save({"model": state, "config": f"model:\n  name: {model_name}\n  output_stride: 32\n", "epoch": 1}, path)
    return str(path)


@pytest.fixture(scope="module")
def resnet18_state():
    """A 10-class ResNet-18 classifier with non-trivial BN statistics."""
    torch.manual_seed(1)
    net = build_model("resnet18", build_norm_act("bn"), num_classes=10)
    for m in net.modules():
        if isinstance(m, ABN):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    return {k: v.clone() for k, v in net.state_dict().items()}


def body(norm: str = "bn", name: str = "resnet18") -> nn.Module:
    torch.manual_seed(2)
    return build_model(name, build_norm_act(norm), num_classes=1)


def assert_loaded(backbone: nn.Module, state: dict, skip=()) -> None:
    """Every backbone tensor outside the head equals the checkpoint's."""
    own = backbone.state_dict()
    checked = [k for k in own if not k.startswith("fc.") and k not in skip]
    assert checked
    for k in checked:
        assert torch.equal(own[k], state[k]), k


def test_strict_load_copies_everything_but_the_head(tmp_path, resnet18_state):
    path = save(tmp_path / "last.pt", "resnet18", resnet18_state)
    backbone = body()
    fc_before = backbone.fc.weight.clone()
    report = load_backbone(backbone, path, strict=True, expected_model="resnet18")
    assert report == {"loaded": len(resnet18_state) - 2, "missing": [], "unexpected": [], "dropped_head": HEAD}
    assert_loaded(backbone, resnet18_state)
    assert torch.equal(backbone.fc.weight, fc_before)  # a (1, 512) head, not the checkpoint's (10, 512)


def test_strict_load_into_frozen_bn(tmp_path, resnet18_state):
    """Detection's frozen-BN body reads a BN checkpoint (FrozenBatchNorm2d ignores num_batches_tracked)."""
    path = save(tmp_path / "last.pt", "resnet18", resnet18_state)
    backbone = body("frozen_bn")
    report = load_backbone(backbone, path, strict=True, expected_model="resnet18")
    assert not report["missing"] and not report["unexpected"]
    assert backbone.layer2[0].bn1.__class__ is FrozenBatchNorm2d
    torch.testing.assert_close(backbone.layer2[0].bn1.running_var, resnet18_state["layer2.0.bn1.running_var"],
                               rtol=0, atol=0)
    torch.testing.assert_close(backbone.bn1.weight, resnet18_state["bn1.weight"], rtol=0, atol=0)


def test_head_replaced_by_identity_is_dropped(tmp_path, resnet18_state, caplog):
    """As DeepLabV3 holds its backbone: the head is an nn.Identity."""
    path = save(tmp_path / "last.pt", "resnet18", resnet18_state)
    backbone = body()
    backbone.fc = nn.Identity()
    with caplog.at_level("INFO", logger="abnexp"):
        report = load_backbone(backbone, path, strict=False)
    assert report["dropped_head"] == HEAD and not report["missing"] and not report["unexpected"]
    assert_loaded(backbone, resnet18_state)
    assert "classification head dropped (fc.bias, fc.weight)" in caplog.text


def mismatched(state: dict) -> dict:
    """The checkpoint without layer4.1.bn2's running mean and with a key the backbone lacks."""
    state = dict(state)
    del state["layer4.1.bn2.running_mean"]
    state["layer4.1.bn2.extra_stat"] = torch.zeros(512)
    return state


def test_strict_raises_naming_missing_and_unexpected_keys(tmp_path, resnet18_state):
    path = save(tmp_path / "odd.pt", "resnet18", mismatched(resnet18_state))
    with pytest.raises(ValueError) as e:
        load_backbone(body(), path, strict=True, expected_model="resnet18")
    message = str(e.value)
    assert path in message and "layer4.1.bn2.running_mean" in message and "layer4.1.bn2.extra_stat" in message
    assert "norm=" in message  # how to fix
    assert "fc.weight" not in message  # the backbone's own head is never "missing"


def test_non_strict_logs_and_loads_the_rest(tmp_path, resnet18_state, caplog):
    path = save(tmp_path / "odd.pt", "resnet18", mismatched(resnet18_state))
    backbone = body()
    initial = backbone.layer4[1].bn2.running_mean.clone()
    with caplog.at_level("INFO", logger="abnexp"):
        report = load_backbone(backbone, path, strict=False)
    assert report["missing"] == ["layer4.1.bn2.running_mean"]
    assert report["unexpected"] == ["layer4.1.bn2.extra_stat"]
    assert report["loaded"] == len(resnet18_state) - 3  # 2 head tensors + the removed one
    assert_loaded(backbone, resnet18_state, skip={"layer4.1.bn2.running_mean"})
    assert torch.equal(backbone.layer4[1].bn2.running_mean, initial)  # left as initialized
    assert "layer4.1.bn2.running_mean" in caplog.text and "layer4.1.bn2.extra_stat" in caplog.text


@pytest.mark.parametrize("strict", [True, False])
def test_shape_mismatch_raises(tmp_path, strict):
    """ResNet-50's bottleneck layer1.0.conv1 is (64, 64, 1, 1), ResNet-18's basic block's (64, 64, 3, 3)."""
    torch.manual_seed(3)
    path = save(tmp_path / "r50.pt", "resnet50", build_model("resnet50", build_norm_act("bn"), 10).state_dict())
    backbone = body()
    before = backbone.conv1.weight.clone()
    expected = r"shapes differ.*layer1\.0\.conv1\.weight \(64, 64, 1, 1\) vs \(64, 64, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        load_backbone(backbone, path, strict=strict)
    assert torch.equal(backbone.conv1.weight, before)  # raised before copying anything


@pytest.fixture(scope="module")
def resnext_checkpoint(tmp_path_factory):
    torch.manual_seed(4)
    state = build_model("resnext50", build_norm_act("bn"), 10).state_dict()
    return save(tmp_path_factory.mktemp("resnext") / "last.pt", "resnext50", state)


def test_another_architecture_raises(resnext_checkpoint):
    with pytest.raises(ValueError, match="holds a resnext50, not a resnet18: set model=resnext50"):
        load_backbone(body(), resnext_checkpoint, strict=True, expected_model="resnet18")
    with pytest.raises(ValueError, match="none of its .* weights belongs to this backbone"):
        load_backbone(body(), resnext_checkpoint, strict=False)


def test_unusable_files_raise(tmp_path, resnet18_state):
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone(body(), tmp_path / "none.pt", strict=False)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_backbone(body(), tmp_path / "junk.pt", strict=False)
    torch.save({"weights": resnet18_state, "epoch": 1}, tmp_path / "bare.pt")  # neither checkpoint nor state dict
    with pytest.raises(ValueError, match="not an abnexp checkpoint"):
        load_backbone(body(), tmp_path / "bare.pt", strict=False)
    torch.save({"model": resnet18_state, "config": "seed: 0\n"}, tmp_path / "noname.pt")
    with pytest.raises(ValueError, match="no model.name"):
        load_backbone(body(), tmp_path / "noname.pt", strict=True, expected_model="resnet18")


def test_models_layer_does_not_import_the_engine():
    code = ("import sys, abnexp.models.pretrained, abnexp.models.detection, abnexp.models.deeplab; "
            "print(sorted(m for m in sys.modules if m.startswith(('abnexp.engine', 'abnexp.tasks'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
