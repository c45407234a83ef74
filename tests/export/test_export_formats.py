"""ONNX (onnx.checker, onnxruntime) and torch.export programs of the inference models against the
PyTorch eval model, on another batch and image size than the export was traced with."""
from __future__ import annotations

import onnx
import pytest
import torch

from abnexp.config import compose
from abnexp.export import inference_model
from abnexp.export.formats import OPSET, TASK_IO, run_onnx, run_pt2, write_onnx, write_pt2
from abnexp.norm import NORMS
from abnexp.tasks import build_task

from export_models import TinyNet, randomize_norms

IMAGES = TASK_IO["cls"]
FAST = ("inplace_abn", "mabn", "cbn", "gn")  # the other norms' exports run in the full suite only
ONNX_NORMS = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in NORMS]
PT2_NORMS = [n if n in FAST[:3] else pytest.param(n, marks=pytest.mark.slow) for n in NORMS]


def expected_output(model, x):
    with torch.no_grad():
        return model(x.clone())


def check_onnx(model, tmp_path, fold: bool, example_hw=(32, 32), check_hw=(48, 24)):
    path = tmp_path / "model.onnx"
    write_onnx(inference_model(model, fold=fold), IMAGES, IMAGES.example(2, *example_hw), path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= OPSET
    ops = {node.op_type for node in proto.graph.node}
    x = IMAGES.example(1, *check_hw)[0]
    (got,) = run_onnx(path, IMAGES, (x,))
    assert (got - expected_output(model, x)).abs().max() <= 1e-4
    return ops


@pytest.mark.parametrize("norm", ONNX_NORMS)
def test_onnx_matches_pytorch_folded(norm, tmp_path):
    ops = check_onnx(randomize_norms(TinyNet(norm)).eval(), tmp_path, fold=True)
    assert "BatchNormalization" not in ops
    assert ("InstanceNormalization" in ops or "GroupNormalization" in ops) == (norm == "gn")


@pytest.mark.parametrize("norm", ["bn", "inplace_abn", "mabn"])
def test_onnx_matches_pytorch_unfolded(norm, tmp_path):
    ops = check_onnx(randomize_norms(TinyNet(norm)).eval(), tmp_path, fold=False)
    assert {"Mul", "Add"} <= ops and "BatchNormalization" not in ops


@pytest.mark.parametrize("norm", PT2_NORMS)
def test_pt2_matches_pytorch(norm, tmp_path):
    model = randomize_norms(TinyNet(norm)).eval()
    path = tmp_path / "model.pt2"
    write_pt2(inference_model(model), IMAGES, IMAGES.example(2, 32, 32), path)
    x = IMAGES.example(3, 40, 24)[0]
    (got,) = run_pt2(path, IMAGES, (x,))
    assert (got - expected_output(model, x)).abs().max() <= 1e-5


@pytest.mark.slow
def test_resnext_onnx(tmp_path):
    """abnexp's pre-activation ResNeXt-50 (norms after residual sums stay affine maps) in InPlace-ABN."""
    torch.manual_seed(0)
    model = randomize_norms(build_task(compose(["model=resnext50", "norm=inplace_abn"])).build_model()).eval()
    check_onnx(model, tmp_path, fold=True, example_hw=(64, 64), check_hw=(96, 64))


@pytest.mark.slow
def test_deeplabv3_onnx_and_pt2(tmp_path):
    """DeepLabV3 (segmentation logits at the input's size, any size) with MABN, both formats."""
    torch.manual_seed(0)
    model = randomize_norms(build_task(compose(["task=semseg", "model=resnet18", "norm=mabn"])).build_model()).eval()
    check_onnx(model, tmp_path, fold=True, example_hw=(64, 64), check_hw=(96, 64))
    path = tmp_path / "model.pt2"
    write_pt2(inference_model(model), IMAGES, IMAGES.example(2, 64, 64), path)
    x = IMAGES.example(1, 96, 64)[0]
    (got,) = run_pt2(path, IMAGES, (x,))
    assert got.shape == (1, 19, 96, 64)
    assert (got - expected_output(model, x)).abs().max() <= 1e-4
