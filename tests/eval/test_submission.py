"""Benchmark submission formats written by ``abnexp eval``, read back by the benchmarks' own code:
Cityscapes labelIds PNGs scored by cityscapesScripts' evalPixelLevelSemanticLabeling, Vistas label-id
PNGs scored by a hand-written confusion matrix, COCO results JSON read by pycocotools' loadRes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from abnexp.config import compose
from abnexp.errors import ConfigError
from abnexp.tasks import build_task
from abnexp.tasks.base import RunContext
from conftest import write_tiny_cityscapes

pytest.importorskip("cityscapesscripts")


def run_eval(cfg, collate_fn=None, batch_size=1):
    """What ``abnexp eval`` does after loading a checkpoint, with a freshly initialized model."""
    torch.manual_seed(0)
    task = build_task(cfg)
    model = task.build_model().eval()
    return task.evaluate_protocols(model, RunContext(), lambda ds, ten_crop: DataLoader(
        ds, batch_size=batch_size, collate_fn=collate_fn or task.collate_fn))


@pytest.fixture(scope="module")
def tiny_cityscapes(tmp_path_factory):
    """5 val demo composites (64x128 labelIds, incl. 0 = unlabeled) in the Cityscapes layout."""
    return write_tiny_cityscapes(tmp_path_factory.mktemp("tiny_cityscapes"), {"train": 1, "val": 5})


def cityscapes_official(gt_files: list[str], predictions, tmp_path, monkeypatch) -> dict:
    """cityscapesScripts' pixel-level evaluation: predictions found by its own file-name lookup."""
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))
    monkeypatch.setenv("CITYSCAPES_EXPORT_DIR", str(tmp_path))
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs

    args = cs.args
    monkeypatch.setattr(args, "predictionPath", str(predictions))
    monkeypatch.setattr(args, "predictionWalk", None)
    monkeypatch.setattr(args, "evalInstLevelScore", False)
    monkeypatch.setattr(args, "JSONOutput", False)
    monkeypatch.setattr(args, "quiet", True)
    found = [cs.getPrediction(args, gt) for gt in gt_files]
    return cs.evaluateImgLists(found, gt_files, args)


def test_cityscapes_labelids_scored_by_the_official_script(tiny_cityscapes, tmp_path, monkeypatch):
    preds = tmp_path / "preds"
    cfg = compose(["task=semseg", "data=cityscapes", f"data.root={tiny_cityscapes}", "model=resnet18",
                   "task.eval_scales=[1.0]", "task.eval_flip=false", f"task.predictions_dir={preds}",
                   "task.predictions_format=cityscapes"])
    results = run_eval(cfg)
    assert list(results) == ["single_scale"]
    ours = results["single_scale"]
    files = sorted((preds / "single_scale").glob("*.png"))
    assert [f.name for f in files] == [f"ulm_000000_{i:06d}_leftImg8bit.png" for i in range(5)]
    values = set(np.unique(np.concatenate([np.asarray(Image.open(f)).ravel() for f in files])).tolist())
    assert len(values) >= 2 and values <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
    gt = sorted(str(p) for p in (tiny_cityscapes / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    official = cityscapes_official(gt, preds / "single_scale", tmp_path, monkeypatch)
    assert ours["miou"] == pytest.approx(100 * official["averageScoreClasses"], abs=1e-9)
    assert set(ours["iou"]) < set(official["classScores"])
    for name, iou in official["classScores"].items():  # its other labels are ignoreInEval: no score
        assert (ours["iou"].get(name) is None) == math.isnan(iou), name
        if not math.isnan(iou):
            assert ours["iou"][name] == pytest.approx(100 * iou, abs=1e-9), name


@pytest.fixture(scope="module")
def tiny_vistas(tmp_path_factory):
    """3 val images (40x56) in the Vistas v1.2 layout; labels: blocks of ids 0-65 (65 = unlabeled)."""
    root = tmp_path_factory.mktemp("tiny_vistas")
    rng = np.random.default_rng(1)
    for split, count in (("training", 1), ("validation", 3)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "v1.2" / "labels").mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / split / "images" / f"v{i}.jpg")
            label = np.kron(rng.integers(0, 66, (5, 7)), np.ones((8, 8))).astype(np.uint8)
            Image.fromarray(label).save(root / split / "v1.2" / "labels" / f"v{i}.png")
    return root


def test_vistas_label_id_pngs(tiny_vistas, tmp_path):
    preds = tmp_path / "vistas"
    cfg = compose(["task=semseg", "data=vistas", f"data.root={tiny_vistas}", "data.long_side=0", "model=resnet18",
                   "task.eval_scales=[1.0]", "task.eval_flip=false", f"task.predictions_dir={preds}",
                   "task.predictions_format=vistas"])
    ours = run_eval(cfg)["single_scale"]
    confmat = np.zeros((65, 65), dtype=np.int64)  # hand-computed from the files: rows ground truth
    for i in range(3):
        png = Image.open(preds / "single_scale" / f"v{i}.png")
        assert png.mode == "L" and png.size == (56, 40)
        pred = np.asarray(png).astype(np.int64)
        gt = np.asarray(Image.open(tiny_vistas / "validation" / "v1.2" / "labels" / f"v{i}.png")).astype(np.int64)
        assert pred.max() <= 64
        keep = gt != 65
        np.add.at(confmat, (gt[keep], pred[keep]), 1)
    tp = np.diag(confmat)
    union = confmat.sum(0) + confmat.sum(1) - tp
    assert ours["miou"] == pytest.approx(100 * np.mean(tp[union > 0] / union[union > 0]), abs=1e-9)


def test_formats_are_checked_against_the_dataset():
    with pytest.raises(ConfigError, match="predictions_format=vistas .* not data=demo_cityscapes"):
        build_task(compose(["task=semseg", "task.predictions_format=vistas"]))
    with pytest.raises(ConfigError, match="valid: palette, ids, cityscapes, vistas"):
        build_task(compose(["task=semseg", "task.predictions_format=jpeg"]))
    with pytest.raises(ConfigError, match="task.predictions_dir=DIR"):
        build_task(compose(["task=detection", "task.format_only=true"]))


@pytest.mark.slow  # two passes of an (untrained) Mask R-CNN over the 16 demo_coco val images
def test_coco_results_json_loads_in_pycocotools(demo_cache, tmp_path):
    """task.predictions_dir: COCO results JSON per IoU type, whose COCOeval (pycocotools, from the file)
    equals abnexp's; task.format_only=true writes the same files and evaluates nothing."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    common = ["task=detection", "model=resnet18", "head.rpn_pre_nms_top_n_test=100",
              "head.rpn_post_nms_top_n_test=50", "head.box_detections_per_img=20", "data.min_size=64", "data.max_size=64"]
    results = run_eval(compose([*common, f"task.predictions_dir={tmp_path / 'a'}"]), batch_size=4)
    task = build_task(compose(common))
    gt = COCO(str(task._split("val").root / "annotations" / "instances_val2017.json"))
    for iou in ("bbox", "segm"):
        path = tmp_path / "a" / f"detections_val2017_abnexp-{iou}_results.json"
        assert results["results"][iou] == str(path)
        entries = json.loads(path.read_text())
        assert entries and {"image_id", "category_id", "score"} <= set(entries[0])
        evaluator = COCOeval(gt, gt.loadRes(str(path)), iou)
        evaluator.params.imgIds = sorted(gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert results[iou]["AP"] == pytest.approx(100 * max(evaluator.stats[0], 0), abs=1e-9)
    only = run_eval(compose([*common, f"task.predictions_dir={tmp_path / 'b'}", "task.format_only=true"]),
                    batch_size=4)
    assert "bbox" not in only and only["num_images"] == results["num_images"] == len(gt.getImgIds())
    for iou in ("bbox", "segm"):
        name = f"detections_val2017_abnexp-{iou}_results.json"
        assert json.loads((tmp_path / "b" / name).read_text()) == json.loads((tmp_path / "a" / name).read_text())
