"""Image classification (ImageNet, demo): cross-entropy training, top-1/top-5 evaluation."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from abnexp.data import classification_sets, dataset_root, eval_transform, image_folder
from abnexp.errors import ConfigError
from abnexp.eval.classification import evaluate, protocols
from abnexp.models import build_model
from abnexp.norm import build_norm_act


class ClassificationTask:
    """Everything task-specific the trainer and ``abnexp eval`` need for ``task=cls``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)

    def build_model(self) -> nn.Module:
        """The configured backbone + classifier; raises ConfigError for an invalid model/norm setting."""
        m = self.cfg.model
        try:
            norm_act = build_norm_act(**self.cfg.norm)  # the norm group's keys are its arguments
            return build_model(m.name, norm_act, num_classes=self.cfg.data.num_classes,
                               output_stride=m.output_stride, input_3x3=m.input_3x3)
        except ValueError as e:  # the builders' messages name the setting and the valid values
            raise ConfigError(str(e)) from None

    def datasets(self):
        """(train, val) datasets; samples are (float32 (3, S, S), int label)."""
        return classification_sets(self.cfg.data)

    def loss(self, model: nn.Module, batch, device: torch.device, channels_last: bool):
        """Cross-entropy of a training batch; returns (loss, batch size)."""
        images, targets = batch
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.criterion(model(images), targets.to(device, non_blocking=True)), len(targets)

    def validate(self, model, val_loader, device, autocast_dtype, channels_last) -> dict:
        """Center-crop validation during training: {"top1", "top5", "num_samples"}."""
        return evaluate(model, val_loader, device, autocast_dtype, channels_last)

    def evaluate_protocols(self, model, device, autocast_dtype, channels_last, make_loader) -> dict:
        """The paper's three protocols → {protocol name: {"top1", "top5", "num_samples", "crop", "ten_crop"}}."""
        d = self.cfg.data
        root = dataset_root(d.name, d.root)
        results = {}
        for p in protocols(d.crop_size, d.large_crop_size):
            tf = eval_transform(p.crop, d.mean, d.std, d.resize_ratio, ten_crop=p.ten_crop)
            loader: DataLoader = make_loader(image_folder(root, "val", tf, d.num_classes), ten_crop=p.ten_crop)
            results[p.name] = {**evaluate(model, loader, device, autocast_dtype, channels_last),
                               "crop": p.crop, "ten_crop": p.ten_crop}
        return results
