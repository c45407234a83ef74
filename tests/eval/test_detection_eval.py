"""COCO evaluator against pycocotools run directly on hand-made ground truth and detections."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from abnexp.eval import coco as coco_eval

pytest.importorskip("pycocotools")

CAT_IDS = [3, 7]  # non-contiguous: label 1 -> 3, label 2 -> 7
W, H = 96, 64


def square(x, y, s):
    return [x, y, x + s, y, x + s, y + s, x, y + s]


@pytest.fixture()
def gt(tmp_path):
    """Image 1: a 40x40 square (cat 3) and a 20x30 rectangle (cat 7); image 2: no object."""
    from pycocotools.coco import COCO

    anns = [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": [square(10, 10, 40)], "area": 1600.0,
             "bbox": [10, 10, 40, 40], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "segmentation": [[60, 20, 80, 20, 80, 50, 60, 50]],
             "area": 600.0, "bbox": [60, 20, 20, 30], "iscrowd": 0}]
    data = {"images": [{"id": 1, "width": W, "height": H, "file_name": "1.png"},
                       {"id": 2, "width": W, "height": H, "file_name": "2.png"}],
            "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in CAT_IDS]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    coco = COCO(str(path))
    return coco, path


def perfect_output(coco) -> dict:
    """A detector output reproducing image 1's ground truth exactly (boxes xyxy, mask probabilities)."""
    anns = coco.imgToAnns[1]
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=torch.float32)
    masks = torch.stack([torch.from_numpy(coco.annToMask(a)).float() for a in anns])[:, None] * 0.9
    return {"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2]), "masks": masks}


def direct_pycocotools_ap(gt_path, results: list[dict], iou_type: str, tmp_path) -> np.ndarray:
    """COCOeval run the documented way: results JSON file -> loadRes -> evaluate/accumulate/summarize."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    res = tmp_path / f"res_{iou_type}.json"
    res.write_text(json.dumps(results))
    coco_gt = COCO(str(gt_path))
    e = COCOeval(coco_gt, coco_gt.loadRes(str(res)), iou_type)
    e.params.imgIds = [1, 2]
    e.evaluate()
    e.accumulate()
    e.summarize()
    return e.stats[:6] * 100


def test_perfect_predictions_give_ap_100(gt):
    coco, _ = gt
    out = perfect_output(coco)
    boxes = out["boxes"].clone()
    dets = coco_eval.detections_to_coco(out, 1, CAT_IDS)
    assert torch.equal(out["boxes"], boxes)  # the detector's output is left as it was
    assert [d["category_id"] for d in dets["bbox"]] == [3, 7]  # labels mapped back to COCO ids
    assert dets["bbox"][1]["bbox"] == [60, 20, 20, 30]  # xyxy -> xywh
    for iou_type in ("bbox", "segm"):
        m = coco_eval.coco_metrics(coco, dets[iou_type], iou_type, [1, 2])
        assert m["AP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0)
        assert m["AP75"] == pytest.approx(100.0)
        assert np.isnan(m["APl"])  # no ground truth above 96^2 px: COCOeval's -1 is reported as NaN


def test_shifted_box_gives_the_ap_pycocotools_computes(gt, tmp_path):
    coco, gt_path = gt
    out = perfect_output(coco)
    out["boxes"][0] += torch.tensor([6.0, 0.0, 6.0, 0.0])  # IoU = 34*40 / (2*1600 - 34*40) = 0.739
    del out["masks"]
    dets = coco_eval.detections_to_coco(out, 1, CAT_IDS)["bbox"]
    ours = coco_eval.coco_metrics(coco, dets, "bbox", [1, 2])
    direct = direct_pycocotools_ap(gt_path, dets, "bbox", tmp_path)
    assert [ours[k] for k in coco_eval.METRICS[:5]] == pytest.approx(list(direct[:5]))
    # By hand: category 3 matches at IoU thresholds .50-.70 (5 of 10) -> AP 50; category 7 is exact
    # -> AP 100; the mean over the two categories is 75, AP50 100, AP75 (3: miss, 7: hit) 50.
    assert ours["AP"] == pytest.approx(75.0) and ours["AP50"] == pytest.approx(100.0)
    assert ours["AP75"] == pytest.approx(50.0)


def test_no_detections_give_zero_ap(gt):
    coco, _ = gt
    m = coco_eval.coco_metrics(coco, [], "bbox", [1, 2])
    assert m["AP"] == 0.0 and m["AP50"] == 0.0


class Replay(nn.Module):
    """Returns prepared outputs in order (a stand-in detector for the evaluation loop)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images):
        return [self.outputs.pop(0) for _ in images]


def test_evaluate_loop_over_a_loader(gt):
    coco, _ = gt
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 1, H, W)}
    loader = [((torch.zeros(3, H, W), torch.zeros(3, H, W)), ({"image_id": 1}, {"image_id": 2}))]
    res = coco_eval.evaluate(Replay([perfect_output(coco), empty]), loader, coco, CAT_IDS, ("bbox", "segm"),
                             torch.device("cpu"))
    assert res["num_images"] == 2
    assert res["bbox"]["AP"] == pytest.approx(100.0) and res["segm"]["AP"] == pytest.approx(100.0)


def test_gather_keeps_each_image_once(monkeypatch):
    rank0 = {1: {"bbox": ["a"]}, 2: {"bbox": ["b"]}}
    rank1 = {2: {"bbox": ["b-duplicate"]}, 3: {"bbox": ["c"]}}  # image 2 evaluated by both ranks

    def all_gather_object(shards, obj):
        shards[:] = [rank0, rank1]

    monkeypatch.setattr(coco_eval.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(coco_eval.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(coco_eval.dist, "all_gather_object", all_gather_object)
    merged = coco_eval.gather_detections(rank0)
    assert merged == {1: {"bbox": ["a"]}, 2: {"bbox": ["b"]}, 3: {"bbox": ["c"]}}


def test_gather_through_a_real_process_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert coco_eval.gather_detections({5: {"bbox": [1]}}) == {5: {"bbox": [1]}}
    finally:
        dist.destroy_process_group()
