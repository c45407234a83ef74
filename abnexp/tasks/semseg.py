"""Semantic segmentation (InPlace-ABN Tables 3-4): backbone + DeepLabV3 head, cross-entropy
with ignore label 255, mIoU under single-scale and multi-scale + flip protocols."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.nn.functional as F
from torch import nn

from abnexp.data import dataset_root
from abnexp.data.segmentation import (IGNORE_INDEX, SEGMENTATION, EvalTransform, SegmentationDataset,
                                      segmentation_sets)
from abnexp.config import TaskConfig
from abnexp.errors import ConfigError
from abnexp.eval.segmentation import evaluate, single_image_loader
from abnexp.eval.submission import PredictionWriter, check_format
from abnexp.models import build_model, model_options
from abnexp.models.deeplab import DeepLabV3
from abnexp.models.pretrained import load_backbone
from abnexp.norm import build_norm_act
from abnexp.tasks.base import RunContext, Task

@dataclass
class SegmentationTaskConfig(TaskConfig):
    """``task=semseg``'s keys: the DeepLabV3 head's width and the evaluation protocols (InPlace-ABN
    §4.2: single scale; multi-scale + flip as the reference test script)."""

    head_channels: int = 256  # channels of every DeepLabV3 branch
    eval_scales: list[float] = field(default_factory=lambda: [0.7, 1.0, 1.2])  # multi-scale protocol
    eval_flip: bool = True  # add horizontally flipped inputs to the multi-scale protocol
    eval_window: int = 0  # sliding-window inference with this square window [pixels]; 0 = whole image
    eval_overlap: float = 0.33  # fraction of the window shared by neighbouring windows
    predictions_dir: Optional[str] = None  # abnexp eval: write one PNG per image and protocol here
    predictions_format: str = "palette"  # palette | ids | cityscapes | vistas (abnexp.eval.submission)
    log_images: int = 4  # validation images written to TensorBoard with prediction / ground-truth overlays


class SegmentationTask(Task):
    """Everything task-specific the trainer and ``abnexp eval`` need for ``task=semseg``.

    Raises:
        ConfigError: (on construction) data=<name> is not a segmentation dataset, data.num_classes
            differs from the dataset's, or an evaluation / augmentation setting is out of range.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        d, t = cfg.data, cfg.task
        if d.name not in SEGMENTATION:
            raise ConfigError(f"task=semseg needs a segmentation dataset, data={d.name} is not one; "
                              f"valid: {', '.join(SEGMENTATION)}")
        self.spec = SEGMENTATION[d.name]
        if d.num_classes != len(self.spec.classes):
            raise ConfigError(f"data.num_classes={d.num_classes} but data={d.name} has {len(self.spec.classes)} "
                              f"classes; set data.num_classes={len(self.spec.classes)}")
        if len(d.scale_range) != 2 or not 0 < d.scale_range[0] <= d.scale_range[1]:
            raise ConfigError(f"data.scale_range={list(d.scale_range)}: expected [low, high] with 0 < low <= high")
        if not 0 <= d.class_uniform <= 1:
            raise ConfigError(f"data.class_uniform={d.class_uniform}: expected a probability in [0, 1]")
        if not t.eval_scales or min(t.eval_scales) <= 0:
            raise ConfigError(f"task.eval_scales={list(t.eval_scales)}: expected positive scales, e.g. [0.7,1.0,1.2]")
        if not 0 <= t.eval_overlap < 1 or t.eval_window < 0:
            raise ConfigError(f"task.eval_window={t.eval_window}, task.eval_overlap={t.eval_overlap}: expected a "
                              f"window >= 0 (0 = whole image) and an overlap in [0, 1)")
        try:
            check_format(t.predictions_format, d.name)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def build_model(self) -> nn.Module:
        """DeepLabV3 on the configured backbone (its classifier dropped), with the backbone
        weights of ``model.pretrained`` (an abnexp checkpoint) if set.

        Raises:
            ConfigError: invalid model/norm setting, output stride not 8/16, or a pretrained
                checkpoint that is unreadable or does not fit the backbone.
        """
        m = self.cfg.model
        try:
            norm_act = build_norm_act(**self.cfg.norm)
            backbone = build_model(norm_act=norm_act, num_classes=1, **model_options(m))
            model = DeepLabV3(backbone, self.cfg.data.num_classes, norm_act, self.cfg.task.head_channels)
            if m.pretrained:
                if not Path(m.pretrained).expanduser().is_file():
                    raise ConfigError(
                        f"model.pretrained={m.pretrained} does not exist: give an `abnexp train` checkpoint "
                        f"(<run dir>/checkpoints/last.pt) or a weight file (README, Pretrained weights); to resume or evaluate a run whose pretrained file has "
                        f"moved, add model.pretrained=null (the run's own checkpoint holds every weight)")
                load_backbone(model.backbone, m.pretrained, strict=False)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return model

    def _root(self) -> Path:
        return dataset_root(self.cfg.data.name, self.cfg.data.root)

    def datasets(self):
        """(train, val): train samples (float32 (3, crop, crop), int64 (crop, crop)); val samples
        whole images with labels at their stored size."""
        return segmentation_sets(self.cfg.data, self._root())

    def loss(self, model: nn.Module, batch, ctx: RunContext):
        """Pixel-averaged cross-entropy over non-ignored pixels (0 if a batch has none); returns (loss, batch size)."""
        images, labels = batch
        labels = labels.to(ctx.device, non_blocking=True)
        logits = model(ctx.images(images)).float()
        total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1), len(labels)

    def _evaluate(self, model, loader, ctx: RunContext, scales, flip, **kwargs) -> dict:
        d, t = self.cfg.data, self.cfg.task
        return evaluate(model, single_image_loader(loader), ctx.device, d.num_classes, self.spec.classes,
                        ctx.amp_dtype, ctx.channels_last, scales=scales, flip=flip, window=t.eval_window,
                        overlap=t.eval_overlap, palette=self.spec.palette, mean=d.mean, std=d.std, **kwargs)

    def validate(self, model, val_loader, ctx: RunContext) -> dict:
        """Single-scale validation during training: {"miou", "pixel_acc", "mean_acc" [%], "num_images",
        "images": TensorBoard overlays (image | ground truth | prediction)}."""
        r = self._evaluate(model, val_loader, ctx, (1.0,), False,
                           log_images=self.cfg.task.log_images)
        return {k: r[k] for k in ("miou", "pixel_acc", "mean_acc", "num_images", "images")}

    def evaluate_protocols(self, model, ctx: RunContext, make_loader) -> dict:
        """{"single_scale": ..., "multi_scale_flip" (or "multi_scale"): ...}, each {"miou", "pixel_acc",
        "mean_acc" [%], "iou": {class: % or None}, "num_images", "num_pixels", "scales", "flip", "window"}.
        With task.predictions_dir, PNGs go to <predictions_dir>/<protocol>/<image stem>.png in
        task.predictions_format (:mod:`abnexp.eval.submission`)."""
        d, t = self.cfg.data, self.cfg.task
        val = SegmentationDataset(self.spec, self._root(), "val", EvalTransform(d.long_side, d.mean, d.std))
        loader = make_loader(val, False)
        protocols = {"single_scale": ((1.0,), False)}
        if list(t.eval_scales) != [1.0] or t.eval_flip:
            protocols["multi_scale_flip" if t.eval_flip else "multi_scale"] = (tuple(t.eval_scales), t.eval_flip)
        results = {}
        for name, (scales, flip) in protocols.items():
            writer = (PredictionWriter(Path(t.predictions_dir) / name, t.predictions_format, self.spec)
                      if t.predictions_dir else None)
            r = self._evaluate(model, loader, ctx, scales, flip, writer=writer)
            r.pop("images")
            results[name] = {**r, "scales": list(scales), "flip": flip, "window": t.eval_window}
        return results

    def format_table(self, results: dict) -> str:
        """Markdown: mIoU / pixel accuracy per protocol, then per-class IoU [%] per protocol."""
        names = list(results)
        lines = ["| protocol | mIoU [%] | pixel acc [%] | mean acc [%] | images |", "|---|---|---|---|---|"]
        for name, r in results.items():
            lines.append(f"| {name} (scales {r['scales']}, flip {r['flip']}) | {r['miou']:.2f} | "
                         f"{r['pixel_acc']:.2f} | {r['mean_acc']:.2f} | {r['num_images']} |")
        lines += ["", "| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for c in self.spec.classes:
            cells = [results[n]["iou"][c] for n in names]
            lines.append(f"| {c} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |")
        return "\n".join(lines)
