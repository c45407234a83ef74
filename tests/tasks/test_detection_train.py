"""End to end on the demo data: `abnexp train task=detection` (Mask R-CNN R-50-FPN, a couple of CPU
steps per norm), `abnexp eval` printing the COCOeval tables, and exact resume with grouped batches."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, train_losses

pytestmark = pytest.mark.slow  # Mask R-CNN training steps through the CLI

pytest.importorskip("pycocotools")

# 64 px images (the demo's are 128), few proposals / RoIs (torchvision's defaults: 2000 / 512 / 100): a CPU step
# takes about a second.
FAST = ["task=detection", "data.num_workers=0", "trainer.log_every=1", "data.min_size=64", "data.max_size=64",
        "head.rpn_pre_nms_top_n_train=200", "head.rpn_post_nms_top_n_train=50", "head.box_batch_size_per_image=16",
        "head.rpn_pre_nms_top_n_test=100", "head.rpn_post_nms_top_n_test=20", "head.box_detections_per_img=10"]
NORMS = {"bn": [], "mabn": [], "cbn": ["norm.burnin_iters=0", "norm.window=2"]}  # cbn: compensation from step 2


@pytest.mark.parametrize("norm", list(NORMS))
def test_mask_rcnn_r50_trains_and_evaluates(norm, tmp_path, capsys):
    run = tmp_path / norm
    code, _, err = run_cli(["train", f"hydra.run.dir={run}", *FAST, "model=resnet50", f"norm={norm}", *NORMS[norm],
                            "trainer.max_steps=2"], capsys)
    assert code == 0, err
    losses = train_losses(run)
    assert sorted(losses) == [1, 2] and all(0 < v < 100 for v in losses.values())
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2 and "name: mask_rcnn_fpn" in state["config"]

    code, out, err = run_cli(["eval", f"checkpoint={run / 'checkpoints' / 'last.pt'}"], capsys)
    assert code == 0, err
    assert "COCOeval bbox:" in out and "COCOeval segm:" in out
    assert out.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]") == 2
    assert "| bbox |" in out and "| segm |" in out
    result = json.loads((run / "eval.json").read_text())
    assert result["norm"] == norm and result["protocols"]["num_images"] == 16
    for iou_type in ("bbox", "segm"):
        assert set(result["protocols"][iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert 0.0 <= result["protocols"][iou_type]["AP50"] <= 100.0


def test_faster_rcnn_resumes_exactly_with_grouped_batches(tmp_path, capsys):
    common = [*FAST, "head=faster_rcnn_fpn", "model=resnet18", "trainer.eval_every=100"]
    full = tmp_path / "full"
    assert run_cli(["train", f"hydra.run.dir={full}", *common, "trainer.max_steps=3"], capsys)[0] == 0
    part = tmp_path / "part"
    assert run_cli(["train", f"hydra.run.dir={part}", *common, "trainer.max_steps=1"], capsys)[0] == 0
    assert run_cli(["train", f"hydra.run.dir={part}", *common, "trainer.max_steps=3"], capsys)[0] == 0
    reference, resumed = train_losses(full), train_losses(part)
    assert sorted(resumed) == sorted(reference) == [1, 2, 3]
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
