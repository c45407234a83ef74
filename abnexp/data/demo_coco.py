"""The demo_coco dataset: small, deterministic instance-segmentation data in the COCO layout.

Each image is a random crop of one of scikit-image's bundled photographs (the backgrounds of the
classification demo), resized to 128x128, 128x96 or 96x128 pixels (both aspect-ratio groups),
with 1-3 non-overlapping filled polygons of four categories (triangle, square, disk, star;
radius 12-28 px, random rotation and colour) whose polygons are the instance masks. The first
image of each split has no object. Annotations are written by json in COCO's format
(``segmentation`` polygons, ``area`` from pycocotools, ``bbox`` [x, y, w, h], ``iscrowd`` 0) under
``$ABNEXP_CACHE`` (default ``~/.cache/abnexp``), once, atomically (temporary folder + rename).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from abnexp.data.demo import SOURCES, sample_photo, cache_dir, generate_once

CATEGORIES = ({"id": 1, "name": "triangle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "disk"},
              {"id": 4, "name": "star"})
SIZES = ((128, 128), (128, 96), (96, 128))  # (width, height) pixels
COUNTS = {"train": 64, "val": 16}  # images per split
ID_OFFSET = {"train": 1, "val": 100_001}  # disjoint image ids, as COCO's splits
VERSION = 1  # bump when the generated content changes


def _polygon(category: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of ``category`` centred at (cx, cy) with circumradius r (pixels)."""
    if category == 4:  # five-pointed star: alternate outer / inner radius
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
    else:
        radii = [r] * {1: 3, 2: 4, 3: 24}[category]
    n = len(radii)
    return [(cx + rad * math.cos(angle + 2 * math.pi * k / n), cy + rad * math.sin(angle + 2 * math.pi * k / n))
            for k, rad in enumerate(radii)]


def _image(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = photo.size
    cw, ch = int(w * rng.uniform(0.3, 0.8)), int(h * rng.uniform(0.3, 0.8))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR)


def _objects(size: tuple[int, int], count: int, rng: np.random.Generator) -> list[tuple[int, list]]:
    """Up to ``count`` (category, vertices) with non-overlapping circumcircles inside the image."""
    w, h = size
    placed: list[tuple[float, float, float]] = []
    objects = []
    for _ in range(50 * count):
        if len(objects) == count:
            break
        r = float(rng.uniform(12, 28))
        cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
        category, angle = int(rng.integers(1, 5)), float(rng.uniform(0, 2 * math.pi))
        if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
            placed.append((cx, cy, r))
            objects.append((category, _polygon(category, cx, cy, r, angle)))
    return objects


def _write(root: Path) -> None:
    from pycocotools import mask as mask_util

    photos = [sample_photo(name) for name in SOURCES]
    (root / "annotations").mkdir(parents=True)
    for split_id, (split, count) in enumerate(COUNTS.items()):
        rng = np.random.default_rng([VERSION, split_id])
        (root / f"{split}2017").mkdir()
        images, annotations = [], []
        for i in range(count):
            image_id = ID_OFFSET[split] + i
            size = SIZES[int(rng.integers(len(SIZES)))]
            image = _image(photos[int(rng.integers(len(photos)))], size, rng)
            draw = ImageDraw.Draw(image)
            for category, vertices in _objects(size, 0 if i == 0 else int(rng.integers(1, 4)), rng):
                draw.polygon(vertices, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
                flat = [round(v, 2) for xy in vertices for v in xy]
                xs, ys = flat[0::2], flat[1::2]
                rle = mask_util.merge(mask_util.frPyObjects([flat], size[1], size[0]))
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                    "segmentation": [flat], "area": float(mask_util.area(rle)), "iscrowd": 0,
                                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]})
            file_name = f"{image_id:012d}.jpg"
            image.save(root / f"{split}2017" / file_name, quality=95)
            images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
        content = {"images": images, "annotations": annotations, "categories": list(CATEGORIES)}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(content))


def ensure_demo_coco(root: str | Path | None = None) -> Path:
    """Returns the demo_coco folder, generating it first if needed (a few seconds).

    Args:
        root: where to put it; None -> ``cache_dir() / f"demo_coco_v{VERSION}"``.
    """
    root = Path(root).expanduser() if root else cache_dir() / f"demo_coco_v{VERSION}"
    return generate_once(root, "annotations/instances_val2017.json", _write)
