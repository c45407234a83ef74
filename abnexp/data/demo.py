"""The demo dataset: real photographs, tiny, deterministic, learnable, no download.

Ten of scikit-image's bundled sample photographs are the ten classes; each image of a class is a
random crop (10–60 % of the photograph's area, random aspect ratio and flip) resized to 64×64
pixels. Train and validation crops come from different random streams. The set is written once
in the ImageNet layout (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``) under
``$ABNEXP_CACHE`` (default ``~/.cache/abnexp``) and then read through the same ImageFolder path
as ImageNet. Generation takes a few seconds and is atomic (temporary folder + rename).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from abnexp.progress import announced

SOURCES = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
           "hubble_deep_field", "rocket")
IMAGE_SIZE = 64  # pixels
PER_CLASS = {"train": 80, "val": 100}
VERSION = 2  # bump when the generated content changes (2: 100 validation crops per class, was 20)
STREAM = 1  # the crops' random streams, unchanged since version 1: the training crops and the first
#             20 validation crops of each class are version 1's


def cache_dir() -> Path:
    """``$ABNEXP_CACHE`` or ``~/.cache/abnexp``."""
    return Path(os.environ.get("ABNEXP_CACHE", Path.home() / ".cache" / "abnexp")).expanduser()


def sample_photo(name: str) -> Image.Image:
    from skimage import data as skdata

    arr = np.asarray(getattr(skdata, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return Image.fromarray(arr).convert("RGB")


def _random_crop(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = photo.size
    area = rng.uniform(0.1, 0.6) * w * h
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    ch = int(min(h, round(np.sqrt(area / aspect))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = photo.crop((x, y, x + cw, y + ch)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def _write(root: Path) -> None:
    for label, name in enumerate(SOURCES):
        photo = sample_photo(name)
        for split_id, (split, count) in enumerate(PER_CLASS.items()):
            rng = np.random.default_rng([STREAM, label, split_id])
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                _random_crop(photo, rng).save(folder / f"{name}_{i:04d}.JPEG", quality=90)


def generate_once(root: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """Creates a generated dataset folder atomically: ``write`` fills a temporary sibling folder
    that is then renamed to ``root``; nothing happens when ``root / marker`` already exists.
    Concurrent processes (ranks) each write their own temporary folder; the first rename wins.
    Making it is logged (what, where, and then how long it took); finding it, not."""
    if (root / marker).exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with announced(f"making the demo data set {root.name} once, a few seconds (in {root})", "demo data made"):
            write(tmp)
        os.rename(tmp, root)
    except OSError:
        if not (root / marker).exists():  # another process finished first: keep theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_demo(root: str | Path | None = None) -> Path:
    """Returns the demo dataset folder, generating it first if it does not exist yet.

    Args:
        root: where to put it; None → ``cache_dir() / f"demo_imagenet_v{VERSION}"``.
    """
    root = Path(root).expanduser() if root else cache_dir() / f"demo_imagenet_v{VERSION}"
    return generate_once(root, "val", _write)
