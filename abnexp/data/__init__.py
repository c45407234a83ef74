"""Datasets: one explicit name → builder table. Each builder returns a dataset root checked
for its layout; the task decides the transforms."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

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


DATASETS: dict[str, Callable[[str | None], Path]] = {
    "demo": _demo_root,
    "imagenet": _imagenet_root,
    "coco": _coco_root,
    "demo_coco": _demo_coco_root,
    "cityscapes": partial(check_seg_root, "cityscapes"),
    "coco_stuff": partial(check_seg_root, "coco_stuff"),
    "vistas": partial(check_seg_root, "vistas"),
    "demo_cityscapes": _demo_cityscapes_root,
}


def dataset_root(name: str, root: str | None) -> Path:
    """The checked root folder of dataset ``name`` (data=<name>, data.root=<root>).

    Raises:
        ConfigError: unknown dataset name (lists the valid ones).
        DatasetError: missing or malformed root (names the path and the expected layout).
    """
    if name not in DATASETS:
        raise ConfigError(f"data.name={name!r} is not a dataset; valid: {', '.join(DATASETS)}")
    return DATASETS[name](root)


def classification_sets(data_cfg) -> tuple:
    """(train, val) ImageFolder datasets of ``data_cfg`` with the recipe's transforms.

    Samples are (float32 tensor (3, crop, crop), int label).
    """
    root = dataset_root(data_cfg.name, data_cfg.root)
    train = image_folder(root, "train", train_transform(
        data_cfg.crop_size, data_cfg.mean, data_cfg.std, data_cfg.color_jitter, data_cfg.lighting,
        data_cfg.min_scale), data_cfg.num_classes)
    val = image_folder(root, "val", eval_transform(data_cfg.crop_size, data_cfg.mean, data_cfg.std,
                                                   data_cfg.resize_ratio), data_cfg.num_classes)
    return train, val


__all__ = ["DATASETS", "AbnexpError", "ConfigError", "DatasetError", "dataset_root",
           "classification_sets", "eval_transform", "train_transform", "image_folder"]
