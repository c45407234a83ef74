"""Semantic segmentation evaluation: confusion matrix → mIoU, per-class IoU, pixel accuracy.

The confusion matrix (rows: ground truth, columns: prediction; pixels labelled
:data:`~abnexp.data.segmentation.IGNORE_INDEX` excluded) is accumulated on the model's device
and summed over processes. IoU_c = TP / (TP + FP + FN); a class with no ground-truth and no
predicted pixel has no IoU (None in the per-class table) and is left out of the mean, as in
torchmetrics' / mmsegmentation's nan-mean; Cityscapes' official script counts over all 19,
which is the same whenever every class occurs in the validation set.

Inference (InPlace-ABN reference test script): for each scale s the image is resized by s, run
(whole, or in overlapping square windows whose logits are averaged), optionally also flipped
horizontally; softmax probabilities are upsampled to the image size and averaged; the
prediction is their argmax, resized (nearest) to the stored label size.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from abnexp.data.segmentation import IGNORE_INDEX
from abnexp.distributed import all_reduce_sum


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts on ``pred``'s device: [t, p] = pixels of ground
    truth t predicted as p. ``pred``, ``target``: int tensors of one shape; target values
    IGNORE_INDEX are skipped (other values must be < num_classes)."""
    valid = target != IGNORE_INDEX
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(confmat: torch.Tensor, class_names) -> dict:
    """{"miou", "pixel_acc", "mean_acc" [%], "iou": {class: % or None}, "num_pixels"} of a confusion matrix."""
    cm = confmat.double().cpu()
    tp, gt, pr = cm.diag(), cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.tensor(float("nan"), dtype=torch.float64))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.tensor(float("nan"), dtype=torch.float64))
    total = cm.sum().item()

    def pct(t: torch.Tensor) -> float:
        return 100.0 * t.nanmean().item() if not t.isnan().all() else float("nan")

    return {"miou": pct(iou), "pixel_acc": 100.0 * tp.sum().item() / max(total, 1), "mean_acc": pct(acc),
            "iou": {n: None if math.isnan(v) else 100.0 * v for n, v in zip(class_names, iou.tolist())},
            "num_pixels": int(total)}


def _windows(size: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - window, 0) + 1, stride))
    return starts if starts[-1] + window >= size else [*starts, size - window]


def forward_logits(model: nn.Module, x: torch.Tensor, window: int = 0, overlap: float = 0.33) -> torch.Tensor:
    """Logits (N, C, H, W) of (N, 3, H, W): one pass, or with ``window`` > 0 and a larger image,
    square windows at stride round(window · (1 − overlap)) (image zero-padded to at least one
    window, last window flush with the border) whose logits are averaged where they overlap."""
    h, w = x.shape[-2:]
    if window <= 0 or (h <= window and w <= window):
        return model(x)
    x = F.pad(x, (0, max(window - w, 0), 0, max(window - h, 0)))
    H, W = x.shape[-2:]
    stride = max(1, round(window * (1 - overlap)))
    total, count = None, x.new_zeros(1, 1, H, W)
    for top in _windows(H, window, stride):
        for left in _windows(W, window, stride):
            out = model(x[..., top:top + window, left:left + window]).float()
            if total is None:
                total = x.new_zeros(x.shape[0], out.shape[1], H, W, dtype=torch.float32)
            total[..., top:top + window, left:left + window] += out
            count[..., top:top + window, left:left + window] += 1
    return (total / count)[..., :h, :w]


def predict(model: nn.Module, image: torch.Tensor, scales=(1.0,), flip: bool = False, window: int = 0,
            overlap: float = 0.33) -> torch.Tensor:
    """Mean softmax probabilities (N, C, H, W) float32 over ``scales`` × (identity, horizontal
    flip if ``flip``) for (N, 3, H, W) normalized images; see the module docstring."""
    h, w = image.shape[-2:]
    probs, n = None, 0
    for s in scales:
        x = image if s == 1 else F.interpolate(image, size=(max(1, round(h * s)), max(1, round(w * s))),
                                               mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            logits = forward_logits(model, x.flip(-1) if flipped else x, window, overlap).float()
            logits = logits.flip(-1) if flipped else logits
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            p = logits.softmax(dim=1)
            probs, n = (p if probs is None else probs + p), n + 1
    return probs / n


def overlay(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, palette: np.ndarray, mean, std,
            max_side: int = 512) -> torch.Tensor:
    """[image | ground truth over image | prediction over image] as uint8 (3, h, 3w) for
    TensorBoard; ``image`` normalized (3, H', W'), ``label``/``pred`` (H, W); ignored pixels show
    the image alone; the long side is reduced to ``max_side``."""
    H, W = label.shape
    s = min(1.0, max_side / max(H, W))
    size = (max(1, round(H * s)), max(1, round(W * s)))
    img = image.float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1) * 255
    pal = torch.from_numpy(palette).float()
    panels = [img]
    for m in (label, pred):
        m = F.interpolate(m[None, None].float().cpu(), size=size, mode="nearest")[0, 0].long()
        color = pal[m].permute(2, 0, 1)
        keep = (m == IGNORE_INDEX)[None].float()
        panels.append(keep * img + (1 - keep) * (0.5 * img + 0.5 * color))
    return torch.cat(panels, dim=2).round().to(torch.uint8)


class _Indexed(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


def single_image_loader(loader: DataLoader) -> DataLoader:
    """One image per batch (images of a set may differ in size), keeping ``loader``'s dataset,
    sampler (this process's shard) and workers; batches are (image, label, index)."""
    return DataLoader(_Indexed(loader.dataset), batch_size=1, sampler=loader.sampler,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int, class_names,
             autocast_dtype: torch.dtype | None = None, channels_last: bool = False, scales=(1.0,),
             flip: bool = False, window: int = 0, overlap: float = 0.33, palette: np.ndarray | None = None,
             mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), log_images: int = 0,
             writer: Callable[[torch.Tensor, str], object] | None = None) -> dict:
    """Scores of ``model`` over ``loader`` (from :func:`single_image_loader`), summed over processes.

    Returns :func:`scores` plus "num_images", and "images": {tag: uint8 (3, h, 3w)} overlays of
    the first ``log_images`` images of this process. With ``writer`` each prediction (H, W) is passed
    with its image's stem (:class:`abnexp.eval.submission.PredictionWriter` writes it as a PNG).

    Raises:
        RuntimeError: the processes together evaluated another number of images than the dataset has.
    """
    model.eval()
    confmat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    count = torch.zeros(1, dtype=torch.int64, device=device)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    images = {}
    for image, label, index in loader:
        x = image.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            probs = predict(model, x, scales, flip, window, overlap)
        pred = probs.argmax(dim=1)
        label = label.to(device, non_blocking=True)
        if pred.shape[-2:] != label.shape[-2:]:
            pred = F.interpolate(pred[:, None].float(), size=label.shape[-2:], mode="nearest")[:, 0].long()
        confmat += confusion_matrix(pred, label, num_classes)
        count += 1
        if len(images) < log_images and palette is not None:
            images[f"val/overlay_{len(images)}"] = overlay(image[0], label[0], pred[0], palette, mean, std)
        if writer is not None:
            writer(pred[0], loader.dataset.dataset.name(int(index)))
    all_reduce_sum(confmat)
    all_reduce_sum(count)
    if count.item() != len(loader.dataset):
        raise RuntimeError(f"segmentation evaluation counted {count.item()} images over all processes but the "
                           f"dataset has {len(loader.dataset)}: each image must be evaluated exactly once")
    return {**scores(confmat, class_names), "num_images": int(count.item()), "images": images}
