"""Feature stages the backbones declare: hand-written tap names / channels / strides, feature maps of
those shapes on a 64x64 input, and the tapped tensors against independent references (torchvision's
own ResNet feature extractor; for the pre-activation networks, the raw stage output normalized with
torch's functional batch norm + leaky ReLU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from abnexp.models import build_model
from abnexp.norm import ABN, build_norm_act

# C2..C5 (tap module, channels) by hand: ResNet stage widths 64..512 x expansion (1 basic, 4
# bottleneck); ResNeXt stages 256..2048; WideResNet-38 mod3..mod5 end at 256 / 512 / 1024, mod7 at 4096.
EXPECTED = {
    "resnet18": [("layer1", 64), ("layer2", 128), ("layer3", 256), ("layer4", 512)],
    "resnet50": [("layer1", 256), ("layer2", 512), ("layer3", 1024), ("layer4", 2048)],
    "resnext50": [("mod3.block1.bn1", 256), ("mod4.block1.bn1", 512), ("mod5.block1.bn1", 1024), ("bn_out", 2048)],
    "wideresnet38": [("mod4.block1.bn1", 256), ("mod5.block1.bn1", 512), ("mod6.block1.bn1", 1024),
                     ("bn_out", 4096)],
}
# output stride -> strides [pixels] of the four stages (dilated stages keep the previous stride)
STRIDES = {32: (4, 8, 16, 32), 16: (4, 8, 16, 16), 8: (4, 8, 8, 8)}
CASES = [(name, 32) for name in EXPECTED] + [("resnet18", 16), ("resnet18", 8), ("resnext50", 16),
                                             ("resnext50", 8), ("wideresnet38", 16)]


def tapped(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Forward hooks on the declared taps; the tensors they see during ``forward_features``."""
    stages = model.feature_stages()
    out, handles = {}, []
    for i, stage in enumerate(stages):
        def keep(module, inputs, output, i=i):
            out[i] = output.detach().clone()
        handles.append(model.get_submodule(stage.tap).register_forward_hook(keep))
    model.forward_features(x)
    for h in handles:
        h.remove()
    return [out[i] for i in range(len(stages))]


def randomize_norms(model) -> None:
    """Non-trivial running statistics and affine parameters (eval-mode norms then differ from identity)."""
    for m in model.modules():
        if isinstance(m, ABN):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("name, output_stride", CASES)
def test_declared_taps_give_maps_of_the_declared_channels_and_strides(name, output_stride):
    torch.manual_seed(0)
    model = build_model(name, build_norm_act("bn"), num_classes=3, output_stride=output_stride).eval()
    stages = model.feature_stages()
    assert [(s.tap, s.channels) for s in stages] == EXPECTED[name]
    assert tuple(s.stride for s in stages) == STRIDES[output_stride]
    with torch.no_grad():
        maps = tapped(model, torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, c, 64 // s, 64 // s) for (_, c), s in
                                              zip(EXPECTED[name], STRIDES[output_stride])]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_taps_are_torchvisions_layer_outputs(name):
    """Same weights (torchvision's state-dict names) -> the taps equal torchvision's layer1..layer4 outputs."""
    torch.manual_seed(0)
    ours = build_model(name, build_norm_act("bn", activation="relu"), num_classes=1000).eval()
    randomize_norms(ours)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    reference.load_state_dict(ours.state_dict())
    extractor = create_feature_extractor(reference, {f"layer{i}": str(i) for i in range(1, 5)})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = list(extractor(x).values())
        maps = tapped(ours, x)
    for got, ref in zip(maps, expected):
        scale = ref.abs().max().item()  # float32 rounding, relative to the map: the native kernels fuse (x - mean) * scale + beta
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * max(scale, 1.0))


def norm_act(raw: torch.Tensor, layer: ABN) -> torch.Tensor:
    """Eval-mode batch norm + leaky ReLU by torch's functional ops."""
    y = F.batch_norm(raw, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps)
    return F.leaky_relu(y, layer.activation_param)


def test_preactivation_taps_are_the_normalized_stage_outputs():
    """ResNeXt / WideResNet-38: each tap is its stage's raw residual output, normalized and activated
    (by the next stage's first bn1, or bn_out after the last stage)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for name in ("resnext50", "wideresnet38"):
        model = build_model(name, build_norm_act("bn", activation="leaky_relu", activation_param=0.1), 3).eval()
        randomize_norms(model)
        with torch.no_grad():
            if name == "resnext50":
                raw, h = [], model.mod1(x)
                for stage in (model.mod2, model.mod3, model.mod4, model.mod5):
                    h = stage(h)
                    raw.append(h)
                norms = [model.mod3.block1.bn1, model.mod4.block1.bn1, model.mod5.block1.bn1, model.bn_out]
            else:
                h = model.mod3(model.pool3(model.mod2(model.pool2(model.mod1(x)))))
                raw = [h]
                for stage in (model.mod4, model.mod5):
                    h = stage(h)
                    raw.append(h)
                raw.append(model.mod7(model.mod6(h)))
                norms = [model.mod4.block1.bn1, model.mod5.block1.bn1, model.mod6.block1.bn1, model.bn_out]
            expected = [norm_act(r, n) for r, n in zip(raw, norms)]
            maps = tapped(model, x)
        assert len(maps) == 4
        for got, ref in zip(maps, expected):
            torch.testing.assert_close(got, ref)
