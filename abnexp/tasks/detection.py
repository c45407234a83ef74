"""Instance detection / segmentation (``task=detection``): FPN Mask R-CNN / Faster R-CNN on COCO.

The MABN and CBN papers' COCO experiments: torchvision's detectors with our backbone and norm
(:mod:`abnexp.models.detection`), COCO data through pycocotools (:mod:`abnexp.data.coco`),
box / mask AP from COCOeval (:mod:`abnexp.eval.coco`).

Norm placement (``head.norm_placement``, CBN paper Table 5): ``heads`` = frozen BN
(``norm=frozen_bn``'s layer) in the backbone, initialized from ``model.pretrained``, and ``norm=``
in the FPN and the box / mask heads; ``everywhere`` = ``norm=`` in the backbone too (the MABN
paper's from-scratch and fine-tuning runs); ``auto`` = ``heads`` with ``model.pretrained``, else
``everywhere`` (torchvision's rule: frozen BN only on trained weights), recorded in the run's config.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from abnexp.data import dataset_root
from abnexp.data.coco import AspectRatioBatchSampler, CocoDetection, collate
from abnexp.config import TaskConfig, choice
from abnexp.errors import ConfigError, DatasetError
from abnexp.eval.coco import METRICS, detect, results_list, score
from abnexp.eval.submission import coco_results_file, write_coco_results
from abnexp.models import build_model, model_options
from abnexp.models.detection import HEADS, BackboneWithFPN, backbone_stages, build_detector
from abnexp.models.pretrained import load_backbone
from abnexp.norm import build_norm_act
from abnexp.tasks.base import RunContext, Task

log = logging.getLogger("abnexp")

DETECTION_DATA = ("coco", "demo_coco")


@dataclass
class DetectionTaskConfig(TaskConfig):
    """``task=detection``'s keys: where ``abnexp eval`` writes COCO results JSON (test-dev submission)."""

    predictions_dir: Optional[str] = None  # abnexp eval: write bbox / segm results JSON (COCO results format) here
    format_only: bool = False  # abnexp eval: only write the results JSON (no COCOeval; needs predictions_dir)


class DetectionTask(Task):
    """Everything task-specific the trainer and ``abnexp eval`` need for ``task=detection``.

    Batches are (images, targets) tuples (``collate_fn``); training batches group images by
    aspect ratio (``train_batch_sampler``).
    """

    collate_fn = staticmethod(collate)

    def __init__(self, cfg):
        if cfg.get("head") is None:
            raise ConfigError("task=detection needs a detector: head=mask_rcnn_fpn or head=faster_rcnn_fpn")
        if cfg.data.name not in DETECTION_DATA:
            raise ConfigError(f"task=detection reads COCO-layout data: data={' or data='.join(DETECTION_DATA)}, "
                              f"not data={cfg.data.name}")
        if cfg.task.format_only and not cfg.task.predictions_dir:
            raise ConfigError("task.format_only=true writes COCO results JSON without evaluating: set "
                              "task.predictions_dir=DIR")
        self.cfg = cfg
        self.masks = HEADS[cfg.head.name].masks
        self.iou_types = ("bbox", "segm") if self.masks else ("bbox",)
        self.group_ids: list[int] = []

    def backbone_settings(self) -> tuple[str, int]:
        """(norm placement, trainable backbone layers) with ``auto`` / ``null`` resolved (torchvision's
        rule: frozen BN and 3 trained stages on pretrained weights, else the norm everywhere and all
        5 stages) and written back into the config, so config.yaml and the checkpoint record what
        was built (``abnexp eval ... model.pretrained=null`` then rebuilds the same model).

        Raises:
            ConfigError: trainable_backbone_layers outside 0-5.
        """
        h, pretrained = self.cfg.head, bool(self.cfg.model.pretrained)
        placement = choice(h.norm_placement)
        trainable = h.trainable_backbone_layers
        if placement == "auto":
            placement = "heads" if pretrained else "everywhere"
        if trainable is None:
            trainable = 3 if pretrained else 5
        if not 0 <= trainable <= 5:
            raise ConfigError(f"head.trainable_backbone_layers={trainable}; valid: 0-5 (stages trained, from the top)")
        if not pretrained and (placement == "heads" or trainable < 5):
            log.warning("head.norm_placement=%s, head.trainable_backbone_layers=%d without model.pretrained: frozen BN "
                        "is the identity and frozen stages keep their random weights unless a checkpoint is loaded "
                        "next (abnexp eval / resume); to train from scratch use norm_placement=everywhere and 5 "
                        "layers", placement, trainable)
        h.norm_placement, h.trainable_backbone_layers = placement, trainable
        return placement, trainable

    def build_model(self) -> nn.Module:
        """The configured detector; raises ConfigError for an invalid model / norm / head setting."""
        m, n, h, d = self.cfg.model, self.cfg.norm, self.cfg.head, self.cfg.data
        placement, trainable = self.backbone_settings()
        try:
            norm_act = build_norm_act(**n)
            body_norm = norm_act if placement == "everywhere" else build_norm_act(
                "frozen_bn", activation=n.activation, activation_param=n.activation_param, eps=n.eps)
            body = build_model(norm_act=body_norm, num_classes=1, **model_options(m))
            if m.pretrained:
                load_backbone(body, m.pretrained, strict=True, expected_model=m.name)
            frozen = [body.get_submodule(name) for stage in backbone_stages(body)[:5 - trainable] for name in stage]
            backbone = BackboneWithFPN(body, norm_act, h.fpn_channels, frozen)
            return build_detector(
                h.name, backbone, norm_act, d.num_classes, h.box_head_convs, h.box_head_fc,
                mask_head_convs=h.get("mask_head_convs", 0),
                min_size=d.min_size, max_size=d.max_size, image_mean=list(d.mean), image_std=list(d.std),
                rpn_pre_nms_top_n_train=h.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=h.rpn_pre_nms_top_n_test,
                rpn_post_nms_top_n_train=h.rpn_post_nms_top_n_train,
                rpn_post_nms_top_n_test=h.rpn_post_nms_top_n_test,
                box_batch_size_per_image=h.box_batch_size_per_image, box_detections_per_img=h.box_detections_per_img)
        except ValueError as e:  # the builders' messages name the setting and the valid values
            raise ConfigError(str(e)) from None

    def _split(self, split: str) -> CocoDetection:
        d = self.cfg.data
        dataset = CocoDetection(dataset_root(d.name, d.root), split, train=split == "train",
                                masks=self.masks and split == "train")
        if dataset.num_classes != d.num_classes:
            raise DatasetError(f"{dataset.root} has {dataset.num_classes} categories but data.num_classes="
                               f"{d.num_classes}; set data.num_classes={dataset.num_classes}")
        return dataset

    def datasets(self):
        """(train, val) :class:`CocoDetection` sets; samples are (float32 (3, H, W), target dict)."""
        train = self._split("train")
        self.group_ids = train.aspect_groups()
        return train, self._split("val")

    def train_batch_sampler(self, sampler, batch_size: int) -> AspectRatioBatchSampler:
        """Aspect-ratio grouped batches over the trainer's ResumableSampler (call after datasets())."""
        return AspectRatioBatchSampler(sampler, self.group_ids, batch_size)

    def loss(self, model: nn.Module, batch, ctx: RunContext):
        """Sum of the detector's losses (RPN objectness + box, RoI class + box [+ mask]); (loss, images)."""
        images, targets = batch
        images = [im.to(ctx.device, non_blocking=True) for im in images]
        targets = [{k: v.to(ctx.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]
        return sum(model(images, targets).values()), len(images)

    def _evaluate(self, model, loader, ctx: RunContext, verbose: bool, write: bool = False) -> dict:
        """COCOeval metrics; with ``write`` and task.predictions_dir, also the results JSON files
        ({"results": {iou type: path}}), and with task.format_only only those."""
        dataset, t = loader.dataset, self.cfg.task
        merged = detect(model, loader, dataset.cat_ids, ctx.device, ctx.amp_dtype)
        files = {}
        if write and t.predictions_dir:  # every process holds every image's detections; the first writes
            folder = Path(t.predictions_dir)
            files = {i: str(coco_results_file(folder, dataset.split, i)) for i in self.iou_types}
            if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
                for i in self.iou_types:
                    write_coco_results(results_list(merged, i), folder, dataset.split, i)
                    log.info("wrote %d %s detections of %d images to %s", len(results_list(merged, i)), i,
                             len(merged), files[i])
        if write and t.format_only:
            return {"results": files, "num_images": len(merged)}
        return {**score(merged, dataset.coco, self.iou_types, verbose), **({"results": files} if files else {})}

    def validate(self, model, val_loader, ctx: RunContext) -> dict:
        """COCO AP [%] during training: {"bbox_AP", "bbox_AP50", ..., "segm_APl", "num_images"}."""
        results = self._evaluate(model, val_loader, ctx, verbose=False)
        flat = {f"{t}_{k}": results[t][k] for t in self.iou_types for k in METRICS}
        return {**flat, "num_images": results["num_images"]}

    def evaluate_protocols(self, model, ctx: RunContext, make_loader) -> dict:
        """COCOeval of the val split (tables printed): {"bbox": {AP, ...}, ["segm": {...}], "num_images"}, and
        "results": {iou type: JSON path} with task.predictions_dir (only those with task.format_only)."""
        return self._evaluate(model, make_loader(self._split("val"), False), ctx, verbose=True, write=True)

    def format_table(self, results: dict) -> str:
        """Markdown table of ``evaluate_protocols``' results."""
        if "bbox" not in results:  # task.format_only
            return "\n".join([f"{t}: {path}" for t, path in results["results"].items()]
                             + [f"{results['num_images']} images (format_only: not evaluated)"])
        lines = [f"| IoU type | {' | '.join(METRICS)} |", "|---" * (len(METRICS) + 1) + "|"]
        for t in self.iou_types:
            lines.append(f"| {t} | " + " | ".join(f"{results[t][k]:.2f}" for k in METRICS) + " |")
        return "\n".join(lines + [f"{results['num_images']} images"])
