"""ImageNet-layout image folders: ``root/{train,val}/<wnid>/*.JPEG``, read by torchvision's ImageFolder.

The demo dataset is written in the same layout and read through the same code.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image
from torchvision.datasets import ImageFolder

from abnexp.errors import DatasetError

LAYOUT = "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (one folder per class in each split)"


def check_root(root: str | Path, name: str = "imagenet") -> Path:
    """Checks the split/class-folder layout before any training starts.

    Raises:
        DatasetError: naming the path and the expected layout, when ``root`` is missing, a split
            folder is missing, a split has no class folders, or train and val classes differ.
    """
    if root is None or str(root) in ("", "???"):
        raise DatasetError(f"data.root is not set for data={name}: pass data.root=PATH with the layout {LAYOUT}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data.root={root} does not exist or is not a folder; expected {LAYOUT}")
    classes = {}
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetError(f"data.root={root} has no '{split}' folder; expected {LAYOUT}")
        classes[split] = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if not classes[split]:
            raise DatasetError(f"{split_dir} has no class folders; expected {LAYOUT}"
                               " (ImageNet's val images must be sorted into <wnid> folders)")
    if classes["train"] != classes["val"]:
        only = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise DatasetError(f"data.root={root}: train and val class folders differ ({len(only)} "
                           f"only in one split, e.g. {only[:3]}); expected {LAYOUT}")
    return root


def load_rgb(path: str) -> Image.Image:
    """Opens an image file as RGB.

    Raises:
        DatasetError: naming the file, when it is corrupt or not an image.
    """
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read image {path}: {e} (remove or replace the file)") from None


def image_folder(root: Path, split: str, transform, num_classes: int) -> ImageFolder:
    """The ``split`` of an ImageNet-layout folder; raises DatasetError if its classes are not ``num_classes``."""
    try:
        dataset = ImageFolder(str(root / split), transform=transform, loader=load_rgb)
    except (FileNotFoundError, RuntimeError) as e:
        raise DatasetError(f"{root / split}: {e}; expected {LAYOUT}") from None
    if len(dataset.classes) != num_classes:
        raise DatasetError(f"{root / split} has {len(dataset.classes)} class folders but data.num_classes="
                           f"{num_classes}; set data.num_classes={len(dataset.classes)} or fix the folder")
    return dataset

