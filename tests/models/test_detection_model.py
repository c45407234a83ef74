"""Detector assembly: FPN taps, norm placement, conv/norm pairing, frozen stages, pretrained backbone."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from abnexp.engine.checkpoint import save_checkpoint
from abnexp.errors import ConfigError
from abnexp.models import build_model
from abnexp.models.detection import BackboneWithFPN, ConvFCBoxHead, MaskHead
from abnexp.norm import ABN, FrozenBatchNorm2d, NormActBase, build_norm_act
from abnexp.norm.factory import NormAct

from test_config import compose_cfg

SMALL = ["head.rpn_pre_nms_top_n_test=50", "head.rpn_post_nms_top_n_test=20", "head.box_detections_per_img=5"]


class MarkedConv(nn.Conv2d):
    """A conv class only the factory hands out (shows which convs came from ``norm_act.conv``)."""


class Recorder(ABN):
    """ABN that remembers the conv it was paired with."""

    def __init__(self, num_features, conv=None, group_size=0, **kw):  # norm=bn's keys (ABN has no groups)
        super().__init__(num_features, **kw)
        self.paired = conv


def recording_norm_act() -> NormAct:
    return dataclasses.replace(build_norm_act("bn"), layer=Recorder, conv=MarkedConv, takes_conv=True)


@pytest.mark.parametrize("name", ["resnet18", "resnext50"])
def test_fpn_levels_and_inplace_safety(name):
    """Strides 4..64, 256 channels; with InPlace-ABN the features equal those of BN with the same
    weights (an overwritten tap would change them)."""
    torch.manual_seed(0)
    bn = BackboneWithFPN(build_model(name, build_norm_act("bn"), 1), build_norm_act("bn"))
    inplace = BackboneWithFPN(build_model(name, build_norm_act("inplace_abn"), 1), build_norm_act("inplace_abn"))
    inplace.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, 64, 96)
    ref, out = bn(x), inplace(x.clone())
    assert {k: tuple(v.shape) for k, v in ref.items()} == {
        "0": (2, 256, 16, 24), "1": (2, 256, 8, 12), "2": (2, 256, 4, 6), "3": (2, 256, 2, 3), "pool": (2, 256, 1, 2)}
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-3, atol=1e-3)  # float32 rounding only


def test_every_fpn_and_head_norm_gets_its_conv():
    na = recording_norm_act()
    fpn = BackboneWithFPN(build_model("resnet18", build_norm_act("bn"), 1), na).fpn
    for part, count in ((fpn, 8), (ConvFCBoxHead(na), 4), (MaskHead(na), 4)):
        norms = [m for m in part.modules() if isinstance(m, Recorder)]
        convs = [m for m in part.modules() if isinstance(m, nn.Conv2d)]
        assert len(norms) == count and len(convs) == count
        assert all(type(c) is MarkedConv and c.bias is None for c in convs)  # built by norm_act.conv, no bias
        assert [n.paired for n in norms] == convs  # each norm paired with the conv right before it


def test_empty_roi_batch_skips_the_norms():
    head = MaskHead(build_norm_act("bn")).train()
    out = head(torch.zeros(0, 256, 14, 14))
    assert out.shape == (0, 256, 14, 14)
    assert all(int(m.num_batches_tracked) == 0 for m in head.modules() if isinstance(m, ABN))


def detector(*overrides):
    from abnexp.tasks import build_task

    return build_task(compose_cfg("task=detection", *SMALL, *overrides)).build_model()


def norms(module):
    return [m for m in module.modules() if isinstance(m, (NormActBase, FrozenBatchNorm2d))]


def test_from_scratch_puts_the_norm_everywhere_and_trains_every_stage():
    model = detector("norm=inplace_abn")
    from abnexp.norm import InPlaceABN

    assert norms(model) == [m for m in model.modules() if isinstance(m, InPlaceABN)]
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert type(model.roi_heads.box_head).__name__ == "ConvFCBoxHead"
    assert type(model.roi_heads.mask_head).__name__ == "MaskHead"
    assert model.roi_heads.box_predictor.cls_score.out_features == 5  # 4 demo categories + background


@pytest.fixture(scope="module")
def imagenet_checkpoint(tmp_path_factory):
    """An `abnexp train`-style checkpoint of a ResNet-18 (BN with non-trivial statistics)."""
    torch.manual_seed(1)
    net = build_model("resnet18", build_norm_act("bn"), num_classes=10)
    for m in net.modules():
        if isinstance(m, ABN):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    cfg = compose_cfg("model=resnet18")
    path = tmp_path_factory.mktemp("imagenet") / "last.pt"
    save_checkpoint({"model": net.state_dict(), "config": OmegaConf.to_yaml(cfg), "epoch": 1, "step": 1}, path)
    return path, net.state_dict()


def test_pretrained_backbone_frozen_bn_and_frozen_stages(imagenet_checkpoint):
    path, weights = imagenet_checkpoint
    model = detector("norm=cbn", f"model.pretrained={path}")
    body = model.backbone.body
    assert not hasattr(body, "fc")
    torch.testing.assert_close(body.layer3[0].conv1.weight, weights["layer3.0.conv1.weight"])
    torch.testing.assert_close(body.layer1[0].bn1.running_var, weights["layer1.0.bn1.running_var"])
    assert all(isinstance(m, FrozenBatchNorm2d) for m in norms(body)) and norms(body)
    from abnexp.norm import CBN2d

    heads = [model.backbone.fpn, model.roi_heads.box_head, model.roi_heads.mask_head]
    assert all(isinstance(m, CBN2d) for h in heads for m in norms(h)) and norms(model.roi_heads.mask_head)
    # trainable_backbone_layers defaults to 3 with pretrained weights: stem and layer1 frozen
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    model.train()
    assert not body.layer1.training and body.layer2.training


def test_everywhere_with_pretrained_weights(imagenet_checkpoint):
    path, weights = imagenet_checkpoint
    model = detector("norm=bn", f"model.pretrained={path}", "head.norm_placement=everywhere",
                     "head.trainable_backbone_layers=5")
    body = model.backbone.body
    assert all(type(m) is ABN for m in norms(body))
    torch.testing.assert_close(body.layer2[0].bn2.running_mean, weights["layer2.0.bn2.running_mean"])
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("overrides, message", [
    (["head.trainable_backbone_layers=6"], "trainable_backbone_layers=6"),
    (["model=wideresnet38"], "no FPN taps"),
    (["model.output_stride=16"], "output_stride=32"),
    (["model.pretrained=/nonexistent/last.pt"], "does not exist"),
    (["model=resnet34", "PRETRAINED"], "holds a resnet18"),
])
def test_configuration_errors(overrides, message, imagenet_checkpoint):
    overrides = [f"model.pretrained={imagenet_checkpoint[0]}" if o == "PRETRAINED" else o for o in overrides]
    with pytest.raises(ConfigError, match=message):
        detector(*overrides)


def test_resolved_placement_is_recorded_in_the_config(caplog):
    from abnexp.tasks import build_task

    cfg = compose_cfg("task=detection", *SMALL)
    build_task(cfg).build_model()
    assert cfg.head.norm_placement == "everywhere" and cfg.head.trainable_backbone_layers == 5
    # what `abnexp eval model.pretrained=null` rebuilds for a run trained with a frozen-BN backbone
    cfg = compose_cfg("task=detection", *SMALL, "head.norm_placement=heads", "head.trainable_backbone_layers=3")
    with caplog.at_level("WARNING", logger="abnexp"):
        model = build_task(cfg).build_model()
    assert "without model.pretrained" in caplog.text
    assert norms(model.backbone.body) and all(isinstance(m, FrozenBatchNorm2d) for m in norms(model.backbone.body))


def test_task_needs_a_head_and_coco_data():
    from abnexp.tasks import build_task

    with pytest.raises(ConfigError, match="head=mask_rcnn_fpn"):
        build_task(compose_cfg("task=detection", "~head"))
    with pytest.raises(ConfigError, match="data=coco or data=demo_coco"):
        build_task(compose_cfg("task=detection", "data=demo"))


def test_classification_composes_without_a_head():
    cfg = compose_cfg()
    assert cfg.task.name == "cls" and cfg.head is None and cfg.data.name == "demo"
    det = compose_cfg("task=detection", "head=faster_rcnn_fpn", "data=coco")
    assert det.head.name == "faster_rcnn_fpn" and det.data.name == "coco" and det.optim.lr == 0.02
    assert list(det.sched.milestones) == [8, 11] and det.trainer.grad_clip == 35.0
