"""Predictions written in the formats benchmarks read (``abnexp eval`` with ``task.predictions_dir``).

Segmentation (``task.predictions_format``, one table, :data:`PREDICTION_FORMATS`): one PNG per
validation image, named after the image file (``<image stem>.png``, e.g.
``frankfurt_000000_000294_leftImg8bit.png``, the ``<city>_<seq>_<frame>*.png`` pattern Cityscapes'
``evalPixelLevelSemanticLabeling`` and its benchmark server look up):

============  ======================================================================  ==================
format        pixel values                                                            datasets
============  ======================================================================  ==================
palette       train ids, palette PNG coloured with the dataset's colours (viewing)    any
ids           train ids 0..K-1 as grey values                                         any
cityscapes    Cityscapes labelIds (7 = road, ..., 33 = bicycle; cityscapesScripts'     cityscapes,
              labels.py), the official evaluation's and the test server's input      demo_cityscapes
vistas        Mapillary Vistas v1.2 label ids 0..64 (config_v1.2.json), the            vistas
              benchmark's input
============  ======================================================================  ==================

Detection (``task.predictions_dir``, ``task.format_only``): COCO's results format, one JSON list
per IoU type, ``{"image_id", "category_id", "score", "bbox": [x, y, w, h]}`` (+ ``"segmentation"``:
compressed RLE) as :func:`abnexp.eval.coco.detections_to_coco` makes them, in files named as COCO's
upload expects, ``detections_<split>2017_abnexp-<bbox|segm>_results.json``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class PredictionFormat:
    """One ``task.predictions_format``: ``colour`` (palette PNG of train ids), ``raw_ids`` (train
    ids mapped back to the ids of the dataset's label files), ``datasets`` it applies to (None: any)."""

    description: str
    colour: bool = False
    raw_ids: bool = False
    datasets: Optional[tuple[str, ...]] = None


PREDICTION_FORMATS: dict[str, PredictionFormat] = {
    "palette": PredictionFormat("train ids, coloured palette PNG", colour=True),
    "ids": PredictionFormat("train ids as grey values"),
    "cityscapes": PredictionFormat("Cityscapes labelIds (official evaluation / benchmark)", raw_ids=True,
                                   datasets=("cityscapes", "demo_cityscapes")),
    "vistas": PredictionFormat("Mapillary Vistas v1.2 label ids (benchmark)", raw_ids=True, datasets=("vistas",)),
}
"""task.predictions_format -> its entry (see the module docstring)."""


def check_format(name: str, data: str) -> None:
    """Raises ValueError when ``name`` is not a format or does not apply to dataset ``data``."""
    if name not in PREDICTION_FORMATS:
        raise ValueError(f"task.predictions_format={name!r}; valid: {', '.join(PREDICTION_FORMATS)}")
    fmt = PREDICTION_FORMATS[name]
    if fmt.datasets is not None and data not in fmt.datasets:
        raise ValueError(f"task.predictions_format={name} writes {fmt.description}, for data="
                         f"{' / '.join(fmt.datasets)}, not data={data}; use ids or palette")


def raw_id_table(lut: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) uint8: train id -> the label-file id that ``lut`` (label-file id -> train id,
    :class:`~abnexp.data.segmentation.LabelKind`) maps to it (the first, if several)."""
    out = np.zeros(num_classes, dtype=np.uint8)
    for t in range(num_classes):
        ids = np.flatnonzero(lut == t)
        if not len(ids):
            raise ValueError(f"train id {t} has no label id in the dataset's table")
        out[t] = ids[0]
    return out


class PredictionWriter:
    """Writes (H, W) train-id predictions as PNGs ``folder/<name>.png`` in one format.

    Args:
        folder: output folder (created on first write).
        fmt: a key of :data:`PREDICTION_FORMATS`.
        spec: the dataset (:class:`~abnexp.data.segmentation.SegSpec`): its palette and, for raw-id
            formats, its first label kind's table (Cityscapes: labelIds; Vistas: v1.2).
    """

    def __init__(self, folder: Path, fmt: str, spec) -> None:
        entry = PREDICTION_FORMATS[fmt]
        self.folder = Path(folder)
        self.palette = spec.palette if entry.colour else None
        lut = next(iter(spec.kinds.values())).lut
        self.ids = raw_id_table(lut, len(spec.classes)) if entry.raw_ids else None

    def __call__(self, pred: torch.Tensor, name: str) -> Path:
        """Writes ``pred`` (H, W) int train ids as ``<folder>/<name>.png``; returns the path."""
        values = pred.cpu().numpy().astype(np.uint8)
        if self.ids is not None:
            values = self.ids[values]
        img = Image.fromarray(values, mode="P" if self.palette is not None else "L")
        if self.palette is not None:
            img.putpalette(self.palette.reshape(-1).tolist())
        path = self.folder / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        return path


def coco_results_file(folder: Path, split: str, iou_type: str) -> Path:
    """``folder/detections_<split>2017_abnexp-<iou_type>_results.json`` (COCO's upload naming)."""
    return Path(folder) / f"detections_{split}2017_abnexp-{iou_type}_results.json"


def write_coco_results(results: list[dict], folder: Path, split: str, iou_type: str) -> Path:
    """Writes ``results`` (COCO results format, one IoU type) to :func:`coco_results_file`, atomically;
    pycocotools' ``COCO.loadRes`` reads it. Returns the path."""
    path = coco_results_file(folder, split, iou_type)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results))
    tmp.replace(path)
    return path
