"""COCO box and mask AP with pycocotools' COCOeval (the metric of the MABN and CBN COCO tables).

Detections are converted to COCO's results format (``bbox`` [x, y, w, h]; ``segmentation``
compressed RLE of the mask thresholded at 0.5, as torchvision's references and detectron2),
gathered from every process with ``torch.distributed.all_gather_object`` (each image counted
once), then evaluated per IoU type; the six summary numbers are returned in percent.
"""
from __future__ import annotations

import contextlib
import io
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torchvision.ops import box_convert

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""Names of COCOeval's first six summary numbers (AP at IoU .50:.95 / .50 / .75; small, medium, large)."""


def detections_to_coco(output: dict, image_id: int, cat_ids: list[int]) -> dict[str, list[dict]]:
    """One image's detections in COCO results format, {"bbox": [...], "segm": [...]}.

    Args:
        output: a torchvision detector output for one image: ``boxes`` (D, 4) [x1, y1, x2, y2]
            pixels of the input image, ``scores`` (D,), ``labels`` (D,) in 1..K and, for
            Mask R-CNN, ``masks`` (D, 1, H, W) probabilities.
        image_id: the COCO image id.
        cat_ids: category id of label l at index l - 1.
    """
    from pycocotools import mask as mask_util

    boxes = box_convert(output["boxes"].float().cpu(), "xyxy", "xywh")
    scores, labels = output["scores"].tolist(), output["labels"].tolist()
    common = [{"image_id": image_id, "category_id": cat_ids[l - 1], "score": s} for l, s in zip(labels, scores)]
    results = {"bbox": [{**c, "bbox": b} for c, b in zip(common, boxes.tolist())]}
    if "masks" in output:
        masks = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = [mask_util.encode(np.asfortranarray(m)) for m in masks]
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-serializable
        results["segm"] = [{**c, "segmentation": r} for c, r in zip(common, rles)]
    return results


def gather_detections(per_image: dict[int, dict[str, list]]) -> dict[int, dict[str, list]]:
    """Every process's {image id: detections} merged into one dict on every process.

    An image evaluated by several processes (DistributedSampler pads the last shard with
    repeated images; an unsharded loader gives each process everything) keeps the detections
    of the lowest rank, so each image counts once. Identity without a process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return dict(per_image)
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, per_image)
    merged: dict[int, dict[str, list]] = {}
    for shard in shards:
        for image_id, dets in shard.items():
            merged.setdefault(image_id, dets)
    return merged


def _load_results(coco_gt, results: list[dict]):
    """COCO object of ``results``; an empty list gives an empty result set (``loadRes`` fails on it)."""
    from pycocotools.coco import COCO

    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(results)
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    empty.createIndex()
    return empty


def coco_metrics(coco_gt, results: list[dict], iou_type: str, image_ids: list[int], verbose: bool = False) -> dict:
    """COCOeval of ``results`` (COCO results format) on ``image_ids``: {AP, AP50, AP75, APs, APm, APl}
    in percent (NaN where COCOeval has no ground truth to average over, e.g. no small objects).

    Args:
        coco_gt: pycocotools COCO of the ground truth.
        iou_type: "bbox" or "segm".
        image_ids: the evaluated images (those without detections count too).
        verbose: print COCOeval's progress and summary table (else silenced).
    """
    from pycocotools.cocoeval import COCOeval

    with (nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())):
        evaluator = COCOeval(coco_gt, _load_results(coco_gt, [dict(r) for r in results]), iou_type)
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float(v * 100.0) if v >= 0 else float("nan") for k, v in zip(METRICS, evaluator.stats[:6])}


@torch.no_grad()
def detect(model, loader, cat_ids: list[int], device: torch.device,
           autocast_dtype: torch.dtype | None = None) -> dict[int, dict[str, list]]:
    """Runs ``model`` (a torchvision detector) over ``loader``: {image id: {"bbox": [...], ["segm": [...]]}}
    in COCO results format (:func:`detections_to_coco`), gathered from every process.

    Batches are (images, targets) tuples (:func:`abnexp.data.coco.collate`); targets carry ``image_id``.
    """
    model.eval()
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    per_image: dict[int, dict[str, list]] = {}
    for images, targets in loader:
        with amp:
            outputs = model([im.to(device, non_blocking=True) for im in images])
        for out, tgt in zip(outputs, targets):
            per_image[int(tgt["image_id"])] = detections_to_coco(out, int(tgt["image_id"]), cat_ids)
    return gather_detections(per_image)


def results_list(merged: dict[int, dict[str, list]], iou_type: str) -> list[dict]:
    """The detections of one IoU type of :func:`detect`'s output, by ascending image id."""
    return [d for image_id in sorted(merged) for d in merged[image_id][iou_type]]


def evaluate(model, loader, coco_gt, cat_ids: list[int], iou_types: tuple[str, ...], device: torch.device,
             autocast_dtype: torch.dtype | None = None, verbose: bool = False) -> dict[str, dict]:
    """Runs ``model`` over ``loader`` (:func:`detect`) and scores it with COCOeval.

    Returns {iou type: {AP, AP50, AP75, APs, APm, APl} [%]} plus "num_images".
    """
    return score(detect(model, loader, cat_ids, device, autocast_dtype), coco_gt, iou_types, verbose)


def score(merged: dict[int, dict[str, list]], coco_gt, iou_types: tuple[str, ...], verbose: bool = False) -> dict:
    """COCOeval of :func:`detect`'s output: {iou type: {AP, ...} [%]} plus "num_images"."""
    image_ids = sorted(merged)
    metrics: dict = {}
    for iou_type in iou_types:
        if verbose:
            print(f"COCOeval {iou_type}:")
        metrics[iou_type] = coco_metrics(coco_gt, results_list(merged, iou_type), iou_type, image_ids, verbose)
    metrics["num_images"] = len(image_ids)
    return metrics
