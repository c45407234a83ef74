"""Datasets: the data table, one entry per ``data=`` option. An entry checks (or generates) the
dataset's root folder and carries the option's schema -- classification, segmentation or detection
data, each extending :class:`abnexp.config.DataConfig` -- so a key of another kind of dataset
(``data=demo data.scale_range=...``) fails at composition; the task decides the transforms."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from torch.utils.data import Subset

from abnexp.config import DataConfig

from abnexp.data import fashion_mnist
from abnexp.data.demo import ensure_demo
from abnexp.data.coco import check_coco_root
from abnexp.data.demo_coco import ensure_demo_coco
from abnexp.data.demo_cityscapes import ensure_demo_cityscapes
from abnexp.data.segmentation import check_seg_root
from abnexp.errors import AbnexpError, ConfigError, DatasetError
from abnexp.data.imagenet import check_root, image_folder
from abnexp.data.transforms import eval_transform, train_transform


def _demo_root(root: str | None) -> Path:
    return check_root(ensure_demo(root), "demo")


def _imagenet_root(root: str | None) -> Path:
    return check_root(root, "imagenet")


def _coco_root(root: str | None) -> Path:
    return check_coco_root(root, "coco")


def _demo_coco_root(root: str | None) -> Path:
    return check_coco_root(ensure_demo_coco(root), "demo_coco")


def _demo_cityscapes_root(root: str | None) -> Path:
    return check_seg_root("demo_cityscapes", ensure_demo_cityscapes(root))


_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class ClassificationData(DataConfig):
    """ImageFolder classification (InPlace-ABN §4.1: RandomResizedCrop, flip, colour jitter, PCA
    lighting; evaluation at ``crop_size``, 10 crops, and ``large_crop_size``). Sizes in pixels."""

    crop_size: int = 56  # training crop and validation center crop
    large_crop_size: int = 80  # the third evaluation protocol (320 on ImageNet)
    resize_ratio: float = 0.875  # validation resize = crop / ratio (224 -> 256)
    mean: list[float] = field(default_factory=lambda: list(_IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(_IMAGENET_STD))
    color_jitter: float = 0.4
    lighting: float = 0.1  # AlexNet-style PCA lighting noise standard deviation
    min_scale: float = 0.08  # RandomResizedCrop lower area bound
    holdout: float = 0.0  # > 0: validate on this fraction of each class of the train split, train on the rest


@dataclass
class FashionMNISTData(DataConfig):
    """Fashion-MNIST's four IDX files (abnexp.data.fashion_mnist): 28x28 gray images repeated to 3
    channels and normalized; training crops of the image zero-padded by ``padding`` pixels, flip."""

    mean: list[float] = field(default_factory=lambda: [0.2860] * 3)  # the training images' pixel mean
    std: list[float] = field(default_factory=lambda: [0.3530] * 3)
    padding: int = 4  # pixels of zero padding before the random 28x28 training crop; 0 = no crop
    flip: bool = True  # random horizontal flip in training
    holdout: float = 0.0  # > 0: validate on this fraction of each class of the train split, train on the rest
    train_subset: int = 0  # > 0: train on the first this many images of each class (of those not held out)


@dataclass
class SegmentationData(DataConfig):
    """Semantic segmentation (InPlace-ABN §4.2, Tables 3-4): random scale, ``crop_size``² crops
    (pixels) padded with the ignore label, flip; ``class_uniform`` as Table 4."""

    crop_size: int = 512
    mean: list[float] = field(default_factory=lambda: list(_IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(_IMAGENET_STD))
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random scale of training images
    long_side: int = 0  # resize images to this long side [pixels] before scaling and at test; 0 = as stored
    class_uniform: float = 0.0  # fraction of training crops sampled class-uniformly


@dataclass
class DetectionData(DataConfig):
    """COCO-style detection: the detector resizes images to a shorter side of ``min_size`` and a
    longer side of at most ``max_size`` pixels (MABN §5.2, CBN §4.2: 800 / 1333)."""

    mean: list[float] = field(default_factory=lambda: list(_IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(_IMAGENET_STD))
    min_size: int = 800
    max_size: int = 1333


@dataclass(frozen=True)
class ClassificationReader:
    """Classification data stored otherwise than as ImageFolder splits: ``sets(data_cfg, root)`` ->
    (train, val) datasets; ``eval_sets(data_cfg, root)`` -> {protocol name: (crop pixels, ten_crop,
    dataset)} for ``abnexp eval``; ``report(root)`` -> ``abnexp data check``'s counts per class."""

    sets: Callable
    eval_sets: Callable
    report: Callable[[Path], str]


@dataclass(frozen=True)
class DatasetSpec:
    """One ``data=`` option: ``root(data.root)`` -> the checked (or generated) root folder
    (raises DatasetError naming the path and the expected layout); ``options``: its schema;
    ``reader``: how a classification dataset not stored as ImageFolder splits is read (None:
    ImageFolder, or not a classification dataset)."""

    root: Callable[[str | None], Path]
    options: type
    reader: ClassificationReader | None = None


DATASETS: dict[str, DatasetSpec] = {
    "demo": DatasetSpec(_demo_root, ClassificationData),
    "imagenet": DatasetSpec(_imagenet_root, ClassificationData),
    "fashion_mnist": DatasetSpec(fashion_mnist.check_root, FashionMNISTData, ClassificationReader(
        fashion_mnist.sets, fashion_mnist.eval_sets, fashion_mnist.report)),
    "cityscapes": DatasetSpec(partial(check_seg_root, "cityscapes"), SegmentationData),
    "coco_stuff": DatasetSpec(partial(check_seg_root, "coco_stuff"), SegmentationData),
    "vistas": DatasetSpec(partial(check_seg_root, "vistas"), SegmentationData),
    "demo_cityscapes": DatasetSpec(_demo_cityscapes_root, SegmentationData),
    "coco": DatasetSpec(_coco_root, DetectionData),
    "demo_coco": DatasetSpec(_demo_coco_root, DetectionData),
}


def dataset_root(name: str, root: str | None) -> Path:
    """The checked root folder of dataset ``name`` (data=<name>, data.root=<root>).

    Raises:
        ConfigError: unknown dataset name (lists the valid ones).
        DatasetError: missing or malformed root (names the path and the expected layout).
    """
    if name not in DATASETS:
        raise ConfigError(f"data.name={name!r} is not a dataset; valid: {', '.join(DATASETS)}")
    return DATASETS[name].root(root)


def classification_sets(data_cfg) -> tuple:
    """(train, val) datasets of ``data_cfg``: its reader's (:class:`ClassificationReader`), else
    ImageFolder datasets with the recipe's transforms.

    Samples are (float32 tensor (3, crop, crop), int label). ``data_cfg.holdout`` = f > 0 holds out
    the last ceil(f * n_c) images (in file-name order) of each class c of the *train* split as the
    validation set (evaluation transform) and trains on the others, for choosing hyper-parameters
    without touching the val split; 0 = the val split.
    """
    root = dataset_root(data_cfg.name, data_cfg.root)
    reader = DATASETS[data_cfg.name].reader
    if reader is not None:
        return reader.sets(data_cfg, root)
    train = image_folder(root, "train", train_transform(
        data_cfg.crop_size, data_cfg.mean, data_cfg.std, data_cfg.color_jitter, data_cfg.lighting,
        data_cfg.min_scale), data_cfg.num_classes)
    tf = eval_transform(data_cfg.crop_size, data_cfg.mean, data_cfg.std, data_cfg.resize_ratio)
    holdout = data_cfg.get("holdout", 0.0)
    if not holdout:
        return train, image_folder(root, "val", tf, data_cfg.num_classes)
    held = holdout_indices(train.targets, holdout)
    kept = [i for i in range(len(train)) if i not in held]
    return Subset(train, kept), Subset(image_folder(root, "train", tf, data_cfg.num_classes), sorted(held))


def holdout_indices(targets: list[int], fraction: float) -> set[int]:
    """Indices of the last ceil(``fraction`` * n_c) samples of each class c (``targets`` in dataset
    order, as ImageFolder's sorted files); raises DatasetError if a class would keep no sample."""
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(targets):
        by_class.setdefault(c, []).append(i)
    held: set[int] = set()
    for c, idx in by_class.items():
        n = math.ceil(fraction * len(idx))
        if n >= len(idx):
            raise DatasetError(f"data.holdout={fraction} leaves no training image of class {c} ({len(idx)} "
                               f"images); choose a smaller fraction")
        held.update(idx[len(idx) - n:])
    return held


__all__ = ["DATASETS", "DatasetSpec", "ClassificationReader", "ClassificationData", "FashionMNISTData", "SegmentationData", "DetectionData", "AbnexpError", "ConfigError", "DatasetError", "dataset_root",
           "classification_sets", "holdout_indices", "eval_transform", "train_transform", "image_folder"]
