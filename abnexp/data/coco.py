"""COCO instance detection / segmentation data read through pycocotools.

Layout (COCO 2017; also the generated demo_coco)::

    root/annotations/instances_train2017.json    root/train2017/<file_name>
    root/annotations/instances_val2017.json      root/val2017/<file_name>

Targets follow torchvision's detection references (``references/detection/coco_utils.py``):
crowd annotations are dropped from the training targets, boxes are converted from COCO's
[x, y, w, h] to [x1, y1, x2, y2], clipped to the image, and degenerate boxes (x2 <= x1 or
y2 <= y1) are dropped; training keeps only images with at least one box wider and taller than
one pixel, counting only non-crowd annotations (as detectron2's
``filter_images_with_only_crowd_annotations``: every training target then has a box). The
validation set keeps every image; COCOeval reads its ground truth (crowd regions included)
straight from the json. Category ids (COCO's are 1..90 with gaps) map to contiguous labels
1..K in ascending id order (0 is background in torchvision's detectors) and back.
"""
from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from abnexp.errors import DatasetError

SPLITS = ("train", "val")


def annotation_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}2017.json"


def check_coco_root(root: str | Path | None, name: str = "coco") -> Path:
    """``root`` as a Path after checking the COCO 2017 layout.

    Raises:
        DatasetError: root unset or a json / image folder missing (names it and the layout).
    """
    if not root:
        raise DatasetError(f"data={name} needs data.root=/path/to/coco (with annotations/instances_"
                           f"{{train,val}}2017.json and {{train,val}}2017/)")
    root = Path(root).expanduser()
    for split in SPLITS:
        for path in (annotation_file(root, split), root / f"{split}2017"):
            if not path.exists():
                raise DatasetError(f"{path} does not exist: data.root must hold annotations/instances_"
                                   f"{{train,val}}2017.json and the {{train,val}}2017/ image folders")
    return root


def _has_valid_box(annotations: list[dict]) -> bool:
    """At least one non-crowd annotation whose box is wider and taller than one pixel."""
    return any(a.get("iscrowd", 0) == 0 and a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in annotations)


class CocoDetection(Dataset):
    """COCO images with torchvision-detection targets.

    ``dataset[i]`` = (image float32 (3, H, W) in [0, 1], target) with target: ``boxes`` float32
    (N, 4) [x1, y1, x2, y2] pixels, ``labels`` int64 (N,) in 1..K, ``masks`` uint8 (N, H, W)
    (with ``masks=True``), ``image_id`` (int, COCO's). Training samples are flipped horizontally
    with probability 0.5 (torch's global RNG: seeded per sample by the trainer).

    Args:
        root: checked dataset root (:func:`check_coco_root`).
        split: "train" or "val".
        train: drop images without a valid box and augment.
        masks: decode instance masks (polygons / RLE) for Mask R-CNN.

    Attributes: ``coco`` (pycocotools COCO of the split), ``cat_ids`` (label l -> cat_ids[l - 1]),
    ``ids`` (image ids, in dataset order), ``num_classes`` (K).

    Raises:
        DatasetError: unreadable annotation json or image (names the file).
    """

    def __init__(self, root: Path, split: str, train: bool, masks: bool) -> None:
        from pycocotools.coco import COCO

        self.root, self.split, self.train, self.masks = Path(root), split, train, masks
        path = annotation_file(self.root, split)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints timing lines
                self.coco = COCO(str(path))
        except (OSError, ValueError, KeyError, AssertionError) as e:
            raise DatasetError(f"{path} is not a readable COCO annotation file: {type(e).__name__}: {e}") from None
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.num_classes = len(self.cat_ids)
        ids = sorted(self.coco.getImgIds())
        self.ids = [i for i in ids if _has_valid_box(self.coco.imgToAnns[i])] if train else ids
        steps = [v2.ToImage(), v2.RandomHorizontalFlip(0.5)] if train else [v2.ToImage()]
        self.transform = v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_groups(self) -> list[int]:
        """0 for landscape (width >= height) images, 1 for portrait ones, in dataset order."""
        return [0 if self.coco.imgs[i]["width"] >= self.coco.imgs[i]["height"] else 1 for i in self.ids]

    def target(self, image_id: int) -> dict:
        """The torchvision target of ``image_id`` (boxes, labels, [masks], image_id), untransformed."""
        info = self.coco.imgs[image_id]
        h, w = info["height"], info["width"]
        anns = [a for a in self.coco.imgToAnns[image_id] if a.get("iscrowd", 0) == 0]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {"boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(h, w)),
                  "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)[keep],
                  "image_id": image_id}
        if self.masks:
            kept = [a for a, k in zip(anns, keep.tolist()) if k]
            masks = torch.stack([torch.from_numpy(self.coco.annToMask(a)) for a in kept]) if kept \
                else torch.zeros((0, h, w), dtype=torch.uint8)
            target["masks"] = tv_tensors.Mask(masks)
        return target

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        path = self.root / f"{self.split}2017" / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")
        except OSError as e:
            raise DatasetError(f"cannot read image {path}: {e}") from None
        return self.transform(image, self.target(image_id))


def collate(batch: list) -> tuple[tuple, tuple]:
    """(images, targets) tuples of a detection batch (images differ in size; the model batches them)."""
    return tuple(zip(*batch))


class AspectRatioBatchSampler(Sampler):
    """Batches whose images share an aspect-ratio group (landscape / portrait), as detectron2's
    ``AspectRatioGroupedDataset`` and torchvision's ``GroupedBatchSampler``, resumable exactly.

    The epoch's batches are made from the whole shuffled order of ``sampler`` (an
    :class:`~abnexp.data.sampling.ResumableSampler`, read from its start whatever its offset):
    an index joins its group's bucket, a full bucket is a batch; the leftovers of all buckets,
    in shuffled order, make the last batches. That gives ``len(order) // batch_size`` batches,
    the same count as plain batching, and the first ``sampler.start // batch_size`` of them are
    skipped (a run resumed mid-epoch continues with the next batch).

    Args:
        sampler: the trainer's ResumableSampler.
        group_ids: group of every dataset index.
        batch_size: images per batch.
    """

    def __init__(self, sampler, group_ids: list[int], batch_size: int) -> None:
        self.sampler, self.group_ids, self.batch_size = sampler, group_ids, batch_size

    def _epoch_batches(self) -> list[list[int]]:
        order = list(self.sampler.sampler)  # this rank's full permutation of the epoch
        buckets: dict[int, list[int]] = defaultdict(list)
        batches, rank = [], {index: pos for pos, index in enumerate(order)}
        for index in order:
            bucket = buckets[self.group_ids[index]]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(bucket[:])
                bucket.clear()
        rest = sorted((i for b in buckets.values() for i in b), key=rank.__getitem__)
        batches += [rest[i:i + self.batch_size] for i in range(0, len(rest) - self.batch_size + 1, self.batch_size)]
        return batches

    def __iter__(self):
        return iter(self._epoch_batches()[self.sampler.start // self.batch_size:])

    def __len__(self) -> int:
        return max(len(self.sampler.sampler) // self.batch_size - self.sampler.start // self.batch_size, 0)
