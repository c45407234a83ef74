"""An upper bound of a Mask / Faster R-CNN training step's memory, on fake tensors.

torchvision's detectors (abnexp.models.detection) select boxes by their values: the RPN drops
small and low-scoring proposals and suppresses overlaps (NMS), the RoI sampler takes at most
``positive_fraction`` of ``batch_size_per_image`` proposals as positives, the mask head sees the
positives only, and the multi-scale RoI pooling assigns each RoI to one FPN level. On fake
tensors none of these counts can be computed (no values), so :func:`upper_bound_losses` runs the
same training forward with every such count at its configured upper bound:

- RPN: torchvision's per-level top ``pre_nms_top_n`` (``rpn._get_top_n_idx``), clipped to the
  image; nothing is removed (no small boxes, no score threshold, NMS suppresses nothing), so
  each image keeps ``post_nms_top_n`` proposals (``head.rpn_post_nms_top_n_train``: 2000);
  its loss over ``rpn.fg_bg_sampler.batch_size_per_image`` anchors (256), half positive;
- RoI heads: the gt boxes appended to the proposals, IoU matching, then
  ``roi_heads.fg_bg_sampler.batch_size_per_image`` RoIs (``head.box_batch_size_per_image``:
  512) per image for the box head, of which ``positive_fraction`` (0.25: 128) go to the mask head;
- RoI pooling: every RoI pooled from the finest level at once (the largest transient the
  per-level loop of ``MultiScaleRoIAlign`` can make);
- the transform's training scale: the largest of its ``min_size`` choices, not a random one.

The matching is IoU max over the gt boxes (torchvision's Matcher without its threshold masks:
the same G x anchors matrices). The modules, the transform (normalize, resize, padding to 32)
and the mask loss are torchvision's own. Gt-dependent bytes (IoU matrices, instance masks)
scale with the gt instances per image the inputs carry (``memory.gt_instances``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align


def detection_inputs(batch: int, height: int, width: int, instances: int, masks: bool,
                     num_classes: int) -> tuple[list[Tensor], list[dict]]:
    """A training batch as abnexp.data.coco collates it: ``batch`` float32 images (3, height,
    width) and targets with ``instances`` boxes (float32 (G, 4) xyxy pixels), labels (int64 (G,)
    in 1..num_classes) and, with ``masks``, instance masks (uint8 (G, height, width))."""
    images = [torch.rand(3, height, width) for _ in range(batch)]
    corner = torch.rand(instances, 2) * torch.tensor([width / 2, height / 2])
    boxes = torch.cat([corner, corner + torch.tensor([width / 2, height / 2])], dim=1)
    targets = [{"boxes": boxes.clone(), "labels": torch.randint(1, num_classes + 1, (instances,)),
                **({"masks": torch.zeros(instances, height, width, dtype=torch.uint8)} if masks else {})}
               for _ in range(batch)]
    return images, targets


def upper_bound_losses(model: nn.Module, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
    """torchvision's R-CNN training forward (``GeneralizedRCNN.forward`` in train mode) with the
    data-dependent counts at their upper bounds (module docstring): {loss name: scalar}.

    Args:
        model: a torchvision ``FasterRCNN`` / ``MaskRCNN`` (abnexp.models.detection.build_detector).
        images: float32 (3, H, W) each; targets: as :func:`detection_inputs`.
    """
    model.transform.torch_choice = max  # the largest of the training scales, not a random one
    images, targets = model.transform(images, targets)
    features = model.backbone(images.tensors)
    proposals, losses = _rpn(model.rpn, images, features, targets)
    losses.update(_roi_heads(model.roi_heads, features, proposals, images.tensors.shape[-2], targets))
    return losses


def _rpn(rpn, images, features: dict, targets: list[dict]) -> tuple[list[Tensor], dict]:
    feats = list(features.values())
    objectness, deltas = rpn.head(feats)
    anchors = rpn.anchor_generator(images, feats)
    n = len(anchors)
    per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(n, -1, 4)
    # filter_proposals without its value-dependent steps: top-n per level, clipped, first post_nms_top_n
    top = rpn._get_top_n_idx(objectness.detach().view(n, -1), per_level)
    proposals = proposals[torch.arange(n)[:, None], top]
    boxes = [box_ops.clip_boxes_to_image(p, size)[:rpn.post_nms_top_n()] for p, size in zip(proposals, images.image_sizes)]
    # assign_targets_to_anchors + compute_loss with batch_size_per_image sampled anchors per image
    labels, matched = [], []
    for a, t in zip(anchors, targets):
        quality, idx = rpn.box_similarity(t["boxes"], a).max(dim=0)
        labels.append((quality >= rpn.proposal_matcher.high_threshold).float())
        matched.append(t["boxes"][idx])
    regression_targets = torch.cat(rpn.box_coder.encode(matched, anchors))
    sampler, count = rpn.fg_bg_sampler, anchors[0].shape[0]
    pos, sampled = _sampled(n, count, sampler.batch_size_per_image, sampler.positive_fraction)
    box_loss = F.smooth_l1_loss(deltas[pos], regression_targets[pos], beta=1 / 9, reduction="sum") / sampled.numel()
    objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled])
    return boxes, {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}


def _sampled(images: int, count: int, batch: int, fraction: float) -> tuple[Tensor, Tensor]:
    """(positive, all sampled) flat indices: the first ``batch`` of each image's ``count``
    candidates, the first ``int(batch * fraction)`` of them positive (the sampler's caps)."""
    batch = min(batch, count)
    offsets = torch.arange(images)[:, None] * count
    return (offsets + torch.arange(int(batch * fraction))).flatten(), (offsets + torch.arange(batch)).flatten()


def _pool(pooler, features: dict, boxes: list[Tensor], padded_height: int) -> Tensor:
    """MultiScaleRoIAlign with every RoI at the finest level: (R, C, out, out)."""
    x = features[pooler.featmap_names[0]]
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
    result = x.new_zeros((rois.shape[0], x.shape[1], *pooler.output_size))
    result[torch.arange(rois.shape[0])] = roi_align(x, rois, pooler.output_size, x.shape[-2] / padded_height,
                                                    pooler.sampling_ratio, aligned=False)
    return result


def _roi_heads(heads, features: dict, proposals: list[Tensor], padded_height: int, targets: list[dict]) -> dict:
    n, sampler = len(proposals), heads.fg_bg_sampler
    gt_boxes, gt_labels = [t["boxes"] for t in targets], [t["labels"] for t in targets]
    proposals = [torch.cat((p, g)) for p, g in zip(proposals, gt_boxes)]  # add_gt_proposals
    batch = min(sampler.batch_size_per_image, proposals[0].shape[0])
    positives = int(batch * sampler.positive_fraction)
    rois, labels, matched, matched_boxes = [], [], [], []
    for p, g, lab in zip(proposals, gt_boxes, gt_labels):
        idx = heads.box_similarity(g, p).max(dim=0)[1][:batch]
        rois.append(p[:batch])
        matched.append(idx)
        labels.append(lab[idx])
        matched_boxes.append(g[idx])
    regression_targets = torch.cat(heads.box_coder.encode(matched_boxes, rois))
    class_logits, box_regression = heads.box_predictor(heads.box_head(_pool(heads.box_roi_pool, features, rois,
                                                                             padded_height)))
    labels = torch.cat(labels)
    pos, _ = _sampled(n, batch, batch, sampler.positive_fraction)
    box_regression = box_regression.reshape(labels.shape[0], -1, 4)
    losses = {"loss_classifier": F.cross_entropy(class_logits, labels),
              "loss_box_reg": F.smooth_l1_loss(box_regression[pos, labels[pos]], regression_targets[pos],
                                               beta=1 / 9, reduction="sum") / labels.numel()}
    if heads.has_mask():
        mask_rois, mask_matched = [r[:positives] for r in rois], [m[:positives] for m in matched]
        mask_logits = heads.mask_predictor(heads.mask_head(_pool(heads.mask_roi_pool, features, mask_rois,
                                                                 padded_height)))
        losses["loss_mask"] = tv_roi_heads.maskrcnn_loss(mask_logits, mask_rois, [t["masks"] for t in targets],
                                                         gt_labels, mask_matched)
    return losses
