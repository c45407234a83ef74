"""The segmentation demo dataset: Cityscapes layout, tiny, deterministic, learnable, no download.

Each 64×128 image is a Voronoi partition into 3–7 regions; every region is filled with a window
of one of eight scikit-image photographs (resized so that the shorter side is 128 pixels) and
labelled with that photograph's class, stored as a Cityscapes labelId (road, sidewalk, building,
vegetation, terrain, sky, person, car). Pixels within one pixel of a region border get labelId 0
("unlabeled", mapped to the ignore label), as the unlabelled seams of real Cityscapes
annotations. A class is thus a texture, recognisable locally: a segmentation network learns it
in a few CPU minutes.

Files: ``leftImg8bit/{train,val}/<city>/<city>_000000_<i>_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/<city>_000000_<i>_gtFine_labelIds.png`` (train: aachen, bremen;
val: frankfurt), written once under ``$ABNEXP_CACHE/demo_cityscapes_v<VERSION>`` (a temporary
folder renamed when complete) and read by the Cityscapes loader.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from abnexp.data.demo import sample_photo, cache_dir, generate_once

# photograph -> Cityscapes labelId (cityscapesScripts labels.py)
SOURCES = (("gravel", 7), ("brick", 8), ("page", 11), ("grass", 21), ("immunohistochemistry", 22),
           ("hubble_deep_field", 23), ("astronaut", 24), ("chelsea", 26))
HEIGHT, WIDTH = 64, 128  # pixels
TEXTURE_SIDE = 128  # shorter side of the resized photographs [pixels]
SPLITS = {"train": (("aachen", 120), ("bremen", 120)), "val": (("frankfurt", 48),)}
VERSION = 1  # bump when the generated content changes


def _textures() -> list[np.ndarray]:
    out = []
    for name, _ in SOURCES:
        photo = sample_photo(name)
        s = TEXTURE_SIDE / min(photo.size)
        size = (max(WIDTH, round(photo.size[0] * s)), max(HEIGHT, round(photo.size[1] * s)))
        out.append(np.asarray(photo.resize(size, Image.BILINEAR)))
    return out


def compose(textures: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One demo sample: (image (HEIGHT, WIDTH, 3) uint8, labelIds (HEIGHT, WIDTH) uint8)."""
    n = int(rng.integers(3, 8))
    seeds = rng.uniform([0, 0], [HEIGHT, WIDTH], size=(n, 2))
    classes = rng.integers(0, len(SOURCES), size=n)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    dist = np.sqrt((yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2)
    order = np.sort(dist, axis=0)
    region = dist.argmin(axis=0)
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    label = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    for r in range(n):
        tex = textures[classes[r]]
        oy = int(rng.integers(0, tex.shape[0] - HEIGHT + 1))
        ox = int(rng.integers(0, tex.shape[1] - WIDTH + 1))
        inside = region == r
        image[inside] = tex[oy:oy + HEIGHT, ox:ox + WIDTH][inside]
        label[inside] = SOURCES[classes[r]][1]
    if n > 1:
        label[order[1] - order[0] < 1.0] = 0  # region seams: "unlabeled"
    return image, label


def _write(root: Path) -> None:
    textures = _textures()
    for split_id, (split, cities) in enumerate(SPLITS.items()):
        for city_id, (city, count) in enumerate(cities):
            rng = np.random.default_rng([VERSION, split_id, city_id])
            (root / "leftImg8bit" / split / city).mkdir(parents=True)
            (root / "gtFine" / split / city).mkdir(parents=True)
            for i in range(count):
                image, label = compose(textures, rng)
                stem = f"{city}_000000_{i:06d}"
                Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                Image.fromarray(label).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")


def ensure_demo_cityscapes(root: str | Path | None = None) -> Path:
    """Returns the demo_cityscapes folder, generating it first (a few seconds) if missing.

    Args:
        root: where to put it; None → ``cache_dir() / f"demo_cityscapes_v{VERSION}"``.
    """
    root = Path(root).expanduser() if root else cache_dir() / f"demo_cityscapes_v{VERSION}"
    return generate_once(root, "gtFine", _write)
