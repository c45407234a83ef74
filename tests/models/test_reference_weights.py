"""The reference InPlace-ABN library's released ImageNet checkpoints (``*.pth.tar``) in abnexp's models.

The files are built from ``data/mapillary_checkpoints.json.gz`` (a copy of every key and shape of the
reference networks' state dicts, as the released files hold them) with random values. The reference
is a hand-mapped model (keys renamed by hand, norm weights rewritten by hand for |γ| + ε) and, for the
convention, torch's own batch_norm and abnexp's ``convert()``.
"""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from abnexp.models import build_model
from abnexp.models.pretrained import load_backbone, load_weights, read_checkpoint
from abnexp.models.reference_weights import SOURCES, adapt_scales, read_weights
from abnexp.norm import build_norm_act
from abnexp.norm.convert import convert
from conftest import run_cli

MANIFEST = json.loads(gzip.open(Path(__file__).parent / "data" / "mapillary_checkpoints.json.gz").read())
NETWORKS = {"resnext50": "resnext50", "resnext101": "resnext101", "resnext152": "resnext152",
            "wider_resnet38_a2": "wideresnet38"}
EPS = 1e-5


def fake_tensor(key: str, shape: list[int], device="cpu") -> torch.Tensor:
    """Random values of the right shape: positive running variances, signed norm weights."""
    if key.endswith("num_batches_tracked"):
        return torch.tensor(1000, device=device)
    if key.endswith("running_var"):
        return torch.empty(shape, device=device).uniform_(0.5, 2.0)
    if len(shape) == 4:  # conv: He-scaled so that activations stay finite through 50 layers
        return torch.randn(shape, device=device) * math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
    if key.endswith(".weight") and len(shape) == 1:  # norm scale, some negative as InPlace-ABN allows
        return torch.empty(shape, device=device).uniform_(0.3, 1.0) * torch.randint(0, 2, shape, device=device).mul(2).sub(1)
    return torch.randn(shape, device=device) * 0.1


def fake_checkpoint(network: str, device="cpu") -> dict:
    """What the reference training script saves: {'epoch', 'best_prec1', 'state_dict', 'optimizer'}."""
    torch.manual_seed(0)
    state = {k: fake_tensor(k, v, device) for k, v in MANIFEST["networks"][network].items()}
    assert MANIFEST["container_keys"] == ["epoch", "best_prec1", "state_dict", "optimizer"]
    return {"epoch": 90, "best_prec1": 78.5, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def hand_mapped(checkpoint: dict) -> dict:
    """The released keys in abnexp's names, by hand: drop 'module.', classifier.fc.* -> classifier.*."""
    out = {}
    for k, v in checkpoint["state_dict"].items():
        assert k.startswith("module.")
        k = k[len("module."):]
        out["classifier." + k[len("classifier.fc."):] if k.startswith("classifier.fc.") else k] = v
    return out


def norm_weights(state: dict) -> list[str]:
    return [k for k in state if k.endswith(".weight") and k[:-6] + "running_var" in state]


@pytest.mark.parametrize("network", NETWORKS)
def test_every_released_key_fills_every_abnexp_tensor(network):
    """All four networks (meta tensors: shapes only): the file is recognized, its model found from its
    structure, and its keys are exactly the model's, with the model's shapes; a strict load passes."""
    checkpoint = fake_checkpoint(network, device="meta")
    assert [n for n, s in SOURCES.items() if s.matches(checkpoint)][0] == "inplace_abn"
    weights = SOURCES["inplace_abn"].read(Path(f"{network}.pth.tar"), checkpoint)
    assert weights.model == NETWORKS[network] and weights.options == {} and weights.inplace_scale
    with torch.device("meta"):
        model = build_model(weights.model, build_norm_act("inplace_abn"), num_classes=1000)
    own = model.state_dict()
    assert set(weights.state) == set(own) == set(hand_mapped(checkpoint))
    assert len(weights.state) == len(MANIFEST["networks"][network])
    assert all(weights.state[k].shape == own[k].shape for k in own)
    load_weights(model, weights, f"{network}.pth.tar")  # raises on any missing / unexpected key


def test_three_3x3_stem_is_recognized():
    """The reference's input_3x3 stem (mod1.conv1/bn1/conv2/bn2/conv3) sets model.input_3x3."""
    with torch.device("meta"):
        model = build_model("resnext101", build_norm_act("bn"), num_classes=1000, input_3x3=True)
    checkpoint = {"state_dict": {f"module.{k.replace('classifier.', 'classifier.fc.')}": v
                                 for k, v in model.state_dict().items()}}
    weights = SOURCES["inplace_abn"].read(Path("x.pth.tar"), checkpoint)
    assert (weights.model, weights.options) == ("resnext101", {"input_3x3": True})
    load_weights(model, weights, "x.pth.tar")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A fake released ResNeXt-50 file on disk, and its content."""
    checkpoint = fake_checkpoint("resnext50")
    path = tmp_path_factory.mktemp("reference") / "resnext50_ipabn_lr_256.pth.tar"
    torch.save(checkpoint, path)
    return path, checkpoint


def reference_model(norm: str, state: dict):
    torch.manual_seed(1)
    model = build_model("resnext50", build_norm_act(norm), num_classes=1000)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def hand_models(released):
    """The released weights loaded by hand into norm=inplace_abn (as stored) and norm=bn (|w| + eps)."""
    _, checkpoint = released
    state = hand_mapped(checkpoint)
    as_bn = dict(state)
    for k in norm_weights(state):
        as_bn[k] = state[k].abs() + EPS
    return {"inplace_abn": reference_model("inplace_abn", state), "bn": reference_model("bn", as_bn)}


def test_convention_same_function_in_either_norm(hand_models):
    """|γ| + ε: the in-place layer computes BN with scale |w| + eps, so the plain-BN model given
    |w| + eps computes the same (checked against torch's batch_norm on one layer, then the whole net)."""
    ipabn, bn = hand_models["inplace_abn"], hand_models["bn"]
    layer = ipabn.mod2.block1.bn1
    x = torch.randn(2, 64, 5, 5)
    expected = F.leaky_relu(F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight.abs() + EPS,
                                         layer.bias, training=False, eps=EPS), 0.01)
    torch.testing.assert_close(layer(x.clone()), expected, rtol=1e-5, atol=1e-6)
    assert bool((layer.weight < 0).any())  # the file has negative weights: a raw copy into BN would be wrong
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bn(image), ipabn(image), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["inplace_abn", "bn"])
def test_pretrained_loads_released_file_by_content(released, hand_models, norm):
    """model.pretrained's loader: every backbone tensor equals the hand-mapped one, the classifier is
    dropped, the model is checked against the file's structure."""
    path, _ = released
    torch.manual_seed(2)
    backbone = build_model("resnext50", build_norm_act(norm), num_classes=19)
    report = load_backbone(backbone, path, strict=True, expected_model="resnext50")
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["dropped_head"] == ["classifier.bias", "classifier.weight"]
    expected = hand_models[norm].state_dict()
    own = backbone.state_dict()
    assert report["loaded"] == len(own) - 2
    for k in own:
        if not k.startswith("classifier."):
            assert torch.equal(own[k], expected[k]), k
    with pytest.raises(ValueError, match="holds a resnext50, not a resnext101: set model=resnext50"):
        load_backbone(backbone, path, strict=True, expected_model="resnext101")


def test_convert_rules_apply_both_ways(hand_models, released):
    """Loading into norm=bn equals convert(in-place model, 'bn'); converting back to inplace_abn
    gives the in-place model's function again (convert's max(w - eps, 0) = |w|)."""
    path, _ = released
    converted = convert(reference_model("inplace_abn", hand_models["inplace_abn"].state_dict()), "bn")
    for k, v in hand_models["bn"].state_dict().items():
        torch.testing.assert_close(converted.state_dict()[k], v, rtol=0, atol=0)
    back = convert(reference_model("bn", hand_models["bn"].state_dict()), "inplace_abn").eval()
    image = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(back(image), hand_models["inplace_abn"](image), rtol=1e-4, atol=1e-4)


def test_bn_weights_into_inplace_layers(tmp_path):
    """An abnexp norm=bn checkpoint into norm=inplace_abn: weights max(w - eps, 0), same features;
    a negative weight cannot be represented and is refused, naming the layer."""
    torch.manual_seed(3)
    bn = build_model("resnet18", build_norm_act("bn"), num_classes=10)
    for k, v in bn.state_dict().items():
        if k.endswith("running_var"):
            v.uniform_(0.5, 2)
        elif k in norm_weights(bn.state_dict()):
            v.uniform_(0.5, 1.5)
    path = tmp_path / "last.pt"
    torch.save({"model": bn.state_dict(), "config": "model:\n  name: resnet18\nnorm:\n  name: bn\n"}, path)
    ipabn = build_model("resnet18", build_norm_act("inplace_abn"), num_classes=10)
    load_backbone(ipabn, path, strict=True, expected_model="resnet18")
    torch.testing.assert_close(ipabn.bn1.weight, (bn.bn1.weight - EPS).detach(), rtol=0, atol=0)
    image = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ipabn.eval().forward_features(image), bn.eval().forward_features(image),
                                   rtol=1e-4, atol=1e-4)
    state = bn.state_dict()
    state["layer2.0.bn1.weight"][:3] = -1.0
    with pytest.raises(ValueError, match=r"layer2\.0\.bn1 \(3 of 128 channels\).*norm=bn"):
        adapt_scales(state, ipabn, inplace_scale=False)


@pytest.mark.slow  # the CLI end to end, twice, on a 25M-parameter network
def test_import_writes_a_checkpoint_eval_rebuilds(released, hand_models, tmp_path, capsys):
    """abnexp import: the checkpoint's config rebuilds the model abnexp eval builds, strictly, and its
    logits equal the hand-mapped model's; norm=bn applies |w| + eps; model.pretrained= reads it too."""
    from abnexp.commands.eval import config_from_checkpoint
    from abnexp.tasks import build_task

    path, _ = released
    image = torch.randn(1, 3, 64, 64)
    for norm in ("inplace_abn", "bn"):
        out = tmp_path / f"{norm}.pt"
        code, stdout, err = run_cli(["import", str(path), f"out={out}", f"norm={norm}"], capsys)
        assert code == 0, err
        state = read_checkpoint(out)
        cfg = config_from_checkpoint(state["config"], [])
        assert (cfg.model.name, cfg.norm.name, cfg.data.num_classes) == ("resnext50", norm, 1000)
        model = build_task(cfg).build_model()
        model.load_state_dict(state["model"], strict=True)  # what abnexp eval does
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(image), hand_models[norm](image), rtol=1e-4, atol=1e-4)
    backbone = build_model("resnext50", build_norm_act("bn"), num_classes=1)
    report = load_backbone(backbone, tmp_path / "inplace_abn.pt", strict=True, expected_model="resnext50")
    assert not report["missing"] and not report["unexpected"]
    torch.testing.assert_close(backbone.bn_out.weight, hand_models["bn"].bn_out.weight, rtol=0, atol=0)


def test_import_errors_are_one_line(released, tmp_path, capsys):
    path, _ = released
    code, _, err = run_cli(["import", str(path)], capsys)
    assert code == 1 and "usage: abnexp import PATH out=FILE" in err
    code, _, err = run_cli(["import", str(path), f"out={tmp_path / 'x.pt'}", "model=resnext101"], capsys)
    assert code == 1 and "holds a resnext50, not a resnext101" in err and "Traceback" not in err
    torch.save(build_model("resnet18", build_norm_act("bn"), 10).state_dict(), tmp_path / "plain.pt")
    code, _, err = run_cli(["import", str(tmp_path / "plain.pt"), f"out={tmp_path / 'y.pt'}"], capsys)
    assert code == 1 and "add model=NAME" in err
    code, _, err = run_cli(["import", str(tmp_path / "plain.pt"), f"out={tmp_path / 'y.pt'}", "model=resnet18"],
                           capsys)
    assert code == 1 and "fc.weight (10, 512) vs (1000, 512)" in err and "data.num_classes=" in err
    assert not (tmp_path / "y.pt").exists()
    assert read_weights(path).source == "inplace_abn"
