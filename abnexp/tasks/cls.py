"""Image classification (ImageNet, demo): cross-entropy training, top-1/top-5 evaluation under the
InPlace-ABN paper's three protocols (Table 2: 224² center crop, 224² 10-crop, 320² center crop)."""
from __future__ import annotations

from torch import nn
from torch.utils.data import DataLoader

from abnexp.data import DATASETS, classification_sets, dataset_root, eval_transform, image_folder
from abnexp.errors import ConfigError
from abnexp.eval.classification import evaluate, protocols
from abnexp.models import build_model, model_options
from abnexp.norm import build_norm_act
from abnexp.tasks.base import RunContext, Task


class ClassificationTask(Task):
    """``task=cls``: the configured backbone + classifier, cross-entropy with
    ``trainer.label_smoothing``; batches are (float32 (N, 3, S, S), int64 (N,))."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)

    def build_model(self) -> nn.Module:
        """The configured backbone + classifier; raises ConfigError for an invalid model/norm setting."""
        m = self.cfg.model
        try:
            norm_act = build_norm_act(**self.cfg.norm)  # the norm group's keys are its arguments
            return build_model(norm_act=norm_act, num_classes=self.cfg.data.num_classes, **model_options(m))
        except ValueError as e:  # the builders' messages name the setting and the valid values
            raise ConfigError(str(e)) from None

    def datasets(self):
        """(train, val) datasets; samples are (float32 (3, S, S), int label)."""
        return classification_sets(self.cfg.data)

    def loss(self, model: nn.Module, batch, ctx: RunContext):
        """Cross-entropy of a training batch; returns (loss, batch size)."""
        images, targets = batch
        return self.criterion(model(ctx.images(images)), targets.to(ctx.device, non_blocking=True)), len(targets)

    def validate(self, model, val_loader, ctx: RunContext) -> dict:
        """Center-crop validation during training: {"top1", "top5", "num_samples"}."""
        return evaluate(model, val_loader, ctx.device, ctx.amp_dtype, ctx.channels_last)

    def evaluate_protocols(self, model, ctx: RunContext, make_loader) -> dict:
        """The paper's three protocols on the val split (a dataset's reader may define its own, e.g.
        Fashion-MNIST's test set at 28 px, center only) → {protocol name: {"top1", "top5",
        "num_samples", "crop", "ten_crop"}}."""
        results = {}
        for name, (crop, ten_crop, dataset) in self._eval_sets().items():
            loader: DataLoader = make_loader(dataset, ten_crop)
            results[name] = {**evaluate(model, loader, ctx.device, ctx.amp_dtype, ctx.channels_last),
                             "crop": crop, "ten_crop": ten_crop}
        return results

    def _eval_sets(self) -> dict:
        """{protocol name: (crop pixels, ten_crop, evaluation dataset)}."""
        d = self.cfg.data
        root = dataset_root(d.name, d.root)
        reader = DATASETS[d.name].reader
        if reader is not None:
            return reader.eval_sets(d, root)
        return {p.name: (p.crop, p.ten_crop, image_folder(root, "val", eval_transform(
            p.crop, d.mean, d.std, d.resize_ratio, ten_crop=p.ten_crop), d.num_classes))
            for p in protocols(d.crop_size, d.large_crop_size)}

    def format_table(self, results: dict) -> str:
        """Markdown: top-1 / top-5 [%] and image count per protocol."""
        lines = ["| protocol | top-1 [%] | top-5 [%] | images |", "|---|---|---|---|"]
        for name, r in results.items():
            label = f"{r['crop']}² {'10-crop' if r['ten_crop'] else 'center'}"
            lines.append(f"| {label} ({name}) | {r['top1']:.2f} | {r['top5']:.2f} | {r['num_samples']} |")
        return "\n".join(lines)
