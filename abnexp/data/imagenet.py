"""ImageNet-layout image folders: ``root/{train,val}/<wnid>/*.JPEG``, read by torchvision's ImageFolder.

The demo dataset is written in the same layout and read through the same code.
:func:`prepare_imagenet` makes the layout from ILSVRC2012's official archives
(``abnexp data prepare imagenet``).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from abnexp.errors import DatasetError
from abnexp.progress import announced

log = logging.getLogger("abnexp")

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



ILSVRC2012 = {"train": 1_281_167, "val": 50_000, "classes": 1000}
"""Images per split and classes of ILSVRC2012 (ImageNet-1k), as its devkit's readme states."""


def folder_counts(root: Path) -> dict[str, tuple[int, int]]:
    """{split: (class folders, image files)} of an ImageNet-layout ``root`` (image files: the
    extensions ImageFolder reads); splits without a folder are left out."""
    counts = {}
    for split in ("train", "val"):
        if (root / split).is_dir():
            classes = [d for d in os.scandir(root / split) if d.is_dir()]
            images = sum(1 for c in classes for f in os.scandir(c.path) if f.name.lower().endswith(IMG_EXTENSIONS))
            counts[split] = (len(classes), images)
    return counts


def prepare_imagenet(src: str | Path, root: str | Path) -> dict[str, tuple[int, int]]:
    """Makes the class-folder layout that ``data=imagenet`` reads (``root/{train,val}/<wnid>/*.JPEG``)
    from ILSVRC2012's three official archives in ``src`` (``ILSVRC2012_img_train.tar``,
    ``ILSVRC2012_img_val.tar``, ``ILSVRC2012_devkit_t12.tar.gz``), through torchvision's ImageNet
    parsing (torchvision.datasets.imagenet: the devkit's meta.mat and validation ground truth into
    ``root/meta.bin``, the per-class training tars unpacked, the validation images moved into their
    class folders), each archive checked against torchvision's MD5 first (minutes for 150 GB).

    Resumable: ``meta.bin`` and each split are made once; a split is unpacked into ``root/.<split>.partial``
    and renamed when complete, so a run stopped midway starts that split again and keeps what was done.

    Returns:
        :func:`folder_counts` of ``root``.

    Raises:
        DatasetError: ``src`` lacks an archive (naming each missing one), or an archive fails the
            MD5 check / cannot be read (torchvision's message).
    """
    from torchvision.datasets import imagenet as tv

    src, root = Path(src).expanduser(), Path(root).expanduser()
    archives = {kind: src / name for kind, (name, _) in tv.ARCHIVE_META.items()}
    missing = [path.name for path in archives.values() if not path.is_file()]
    if missing:
        raise DatasetError(f"src={src} lacks {', '.join(missing)}: put ILSVRC2012's official archives there "
                           f"(image-net.org, ILSVRC2012 downloads), or point src= at their folder")
    root.mkdir(parents=True, exist_ok=True)
    steps = {"meta": (root / tv.META_FILE, lambda: tv.parse_devkit_archive(str(root), str(archives["devkit"]))),
             "train": (root / "train", lambda: tv.parse_train_archive(str(root), str(archives["train"]), ".train.partial")),
             "val": (root / "val", lambda: tv.parse_val_archive(str(root), str(archives["val"]), folder=".val.partial"))}
    for name, (done, make) in steps.items():
        if done.exists():
            log.info("%s: already prepared (%s)", name, done)
            continue
        partial = root / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            with announced(f"{name}: checking its archive (MD5) and unpacking it into {root}", f"{name} prepared"):
                make()
        except RuntimeError as e:  # torchvision: an archive missing or corrupted (MD5)
            raise DatasetError(f"{e} (abnexp data prepare imagenet: src={src})".replace("\n", " ")) from None
        if partial.exists():
            os.rename(partial, done)
    return folder_counts(root)
