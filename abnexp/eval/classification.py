"""Classification evaluation: top-1 / top-5 accuracy (percent) under the InPlace-ABN protocols.

Protocols (InPlace-ABN Table 2 / supplementary Table 1): a center crop of ``crop`` pixels after
resizing the shorter side to crop / 0.875; ten crops of ``crop`` (corners, center and their
horizontal flips) whose logits are averaged; and a center crop of ``large_crop`` pixels. On
ImageNet these are 224² center, 224² 10-crop and 320² center.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from abnexp.distributed import all_reduce_sum


@dataclass(frozen=True)
class Protocol:
    name: str  # key in eval.json: "center", "ten_crop" or "large_center"
    crop: int  # pixels
    ten_crop: bool


def protocols(crop_size: int, large_crop_size: int) -> list[Protocol]:
    """The three protocols of the paper's ImageNet tables (224² center, 224² 10-crop and 320²
    center on ImageNet), named by role so that tables read the same keys at any crop size."""
    return [Protocol("center", crop_size, False),
            Protocol("ten_crop", crop_size, True),
            Protocol("large_center", large_crop_size, False)]


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose target is among the k highest logits, for each k.

    Args:
        logits: (N, num_classes) float. targets: (N,) int64 class indices.
    k larger than num_classes is clamped (every sample counts as correct).
    """
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (N, maxk)
    hit = top.eq(targets.view(-1, 1))
    return [int(hit[:, :min(k, maxk)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast_dtype: torch.dtype | None = None,
             channels_last: bool = False) -> dict:
    """Top-1 / top-5 accuracy in percent over ``loader``, summed over processes.

    Batches are (images, targets) with images (B, 3, S, S), or (B, 10, 3, S, S) for ten crops
    whose logits are averaged per image. Returns {"top1", "top5", "num_samples"}.
    In a distributed run each rank passes its shard (abnexp.data.sampling.ShardSampler).

    Raises:
        RuntimeError: the number of samples counted over all processes differs from
            ``len(loader.dataset)`` (a sample skipped or counted twice, e.g. padded shards).
    """
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else nullcontext())
    for images, targets in loader:
        crops = images.shape[1] if images.ndim == 5 else 1
        images = images.reshape(-1, *images.shape[-3:]).to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp:
            logits = model(images)
        logits = logits.float().reshape(len(targets), crops, -1).mean(dim=1).cpu()
        top1, top5 = topk_correct(logits, targets, (1, 5))
        counts += torch.tensor([top1, top5, len(targets)], dtype=torch.float64)
    counts = all_reduce_sum(counts.to(device)).cpu()  # on the device: nccl reduces CUDA tensors only
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and int(counts[2].item()) != len(dataset):
        raise RuntimeError(f"validation counted {int(counts[2].item())} samples over all processes but "
                           f"the dataset has {len(dataset)}: each sample must be evaluated exactly once")
    n = max(counts[2].item(), 1.0)
    return {"top1": 100.0 * counts[0].item() / n, "top5": 100.0 * counts[1].item() / n,
            "num_samples": int(counts[2].item())}
