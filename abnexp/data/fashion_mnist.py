"""Fashion-MNIST (Xiao, Rasul & Vollgraf, arXiv:1708.07747, 2017): 60,000 training and 10,000 test
images, 28x28 grayscale, 10 classes, from its four official IDX files.

``data.root`` is a folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``, as distributed
by the authors and by Debian's ``dataset-fashion-mnist`` in /usr/share/datasets/fashion-mnist/) or
not. Nothing is downloaded: :func:`check_root` reads every file's IDX header and length (a missing,
truncated or foreign file is named in a one-line DatasetError), and the splits are loaded by
``torchvision.datasets.FashionMNIST`` itself (its IDX reader, its PIL "L" samples) from a temporary
folder in its raw layout, where the gzipped files are decompressed.

Input to the backbones: the gray channel is repeated three times (``Grayscale(3)``), so every
3-channel backbone (and its pretrained weights) runs unchanged, then normalized by the training
set's pixel mean 0.2860 and std 0.3530 in each channel. Training: zero-padded random 28x28 crop
(``data.padding`` pixels each side) and horizontal flip; evaluation: the 28x28 image as it is.
"""
from __future__ import annotations

import copy
import gzip
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
from torchvision import transforms as T
from torchvision.datasets import FashionMNIST

from abnexp.errors import DatasetError

SIDE = 28  # pixels
SPLITS = {"train": "train", "test": "t10k"}  # split -> file prefix
# file kind -> (IDX magic number: uint8 data, dimensions; dims after the count)
KINDS = {"images-idx3-ubyte": (0x0803, (SIDE, SIDE)), "labels-idx1-ubyte": (0x0801, ())}
LAYOUT = ("<root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (the four official Fashion-MNIST "
          "files; e.g. apt-get install dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist)")


def _file(root: Path, name: str) -> Path:
    for path in (root / f"{name}.gz", root / name):
        if path.is_file():
            return path
    raise DatasetError(f"data.root={root} has no {name}(.gz); expected {LAYOUT}")


def _count(path: Path, magic: int, dims: tuple[int, ...]) -> int:
    """Items in one IDX file after checking its header and that its length matches it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            header = f.read(4 + 4 * (1 + len(dims)))
            size = len(header) + sum(len(block) for block in iter(lambda: f.read(1 << 20), b""))
    except (OSError, EOFError) as e:  # gzip: "Compressed file ended before the end-of-stream marker"
        raise DatasetError(f"cannot read {path}: {e} (truncated download? replace the file)") from None
    values = np.frombuffer(header, ">u4") if len(header) == 4 * (2 + len(dims)) else None
    if values is None or values[0] != magic or tuple(values[2:]) != dims:
        raise DatasetError(f"{path} is not a Fashion-MNIST IDX file (header {header[:16].hex()}; expected "
                           f"magic {magic:#010x} and item shape {dims}); expected {LAYOUT}")
    n = int(values[1])
    if size != len(header) + n * math.prod(dims):
        raise DatasetError(f"{path} is truncated or too long: {size} bytes{' uncompressed' * (path.suffix == '.gz')} "
                           f"where its header announces {n} items ({len(header) + n * math.prod(dims)} bytes); "
                           f"replace the file")
    return n


def check_root(root) -> Path:
    """Checks the four files before anything runs; returns the root folder.

    Raises:
        DatasetError: naming the file (and the fix) when ``root`` is unset or not a folder, a file is
            missing, unreadable, truncated, has a foreign header, or a split's image and label counts differ.
    """
    if root is None or str(root) in ("", "???"):
        raise DatasetError(f"data.root is not set for data=fashion_mnist: pass data.root=PATH with {LAYOUT}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data.root={root} does not exist or is not a folder; expected {LAYOUT}")
    for prefix in SPLITS.values():
        images, labels = (_count(_file(root, f"{prefix}-{kind}"), *KINDS[kind]) for kind in KINDS)
        if images != labels:
            raise DatasetError(f"data.root={root}: {prefix} has {images} images but {labels} labels; replace "
                               f"the {prefix}-* files")
    return root


def load_split(root: Path, split: str) -> FashionMNIST:
    """``split`` ("train" | "test") as torchvision's FashionMNIST (no transform yet): ``.data`` uint8
    (N, 28, 28), ``.targets`` int64 (N,), samples (PIL image mode "L", int label). The files are
    linked (or decompressed) into a temporary folder in torchvision's raw layout, which torchvision
    requires to hold all four; only the split's own two are read."""
    with tempfile.TemporaryDirectory(prefix="abnexp-fashion-") as tmp:
        raw = Path(tmp) / FashionMNIST.__name__ / "raw"
        raw.mkdir(parents=True)
        for prefix in SPLITS.values():
            for kind in KINDS:
                name = f"{prefix}-{kind}"
                source = _file(root, name)
                if source.suffix == ".gz" and prefix == SPLITS[split]:
                    with gzip.open(source, "rb") as f, open(raw / name, "wb") as out:
                        shutil.copyfileobj(f, out)
                else:  # read as is, or present only for torchvision's existence check
                    (raw / name).symlink_to(source.resolve())
        return FashionMNIST(tmp, train=split == "train", download=False)


def train_transform(mean, std, padding: int, flip: bool) -> T.Compose:
    """PIL "L" 28x28 -> float32 (3, 28, 28): random crop of the zero-padded image, flip, gray x 3, normalize."""
    steps = [T.RandomCrop(SIDE, padding=padding)] if padding else []
    steps += [T.RandomHorizontalFlip()] if flip else []
    return T.Compose([*steps, T.Grayscale(3), T.ToTensor(), T.Normalize(tuple(map(float, mean)), tuple(map(float, std)))])


def eval_transform(mean, std) -> T.Compose:
    """PIL "L" 28x28 -> float32 (3, 28, 28): gray x 3, normalize (no crop: the native size)."""
    return T.Compose([T.Grayscale(3), T.ToTensor(), T.Normalize(tuple(map(float, mean)), tuple(map(float, std)))])


def with_transform(dataset: FashionMNIST, transform) -> FashionMNIST:
    """A shallow copy of ``dataset`` (sharing its image tensor) with another transform."""
    out = copy.copy(dataset)
    out.transform = transform
    return out


def report(root: Path) -> str:
    """``abnexp data check``: images per split and per class (class balance)."""
    splits = {split: np.bincount(load_split(root, split).targets.numpy(), minlength=10) for split in SPLITS}
    lines = [f"data=fashion_mnist at {root}"] + [f"{s}: {int(c.sum())} images" for s, c in splits.items()]
    lines += ["", "| class | train | test |", "|---|---|---|"]
    lines += [f"| {i} {name} | {splits['train'][i]} | {splits['test'][i]} |" for i, name in enumerate(FashionMNIST.classes)]
    return "\n".join(lines)


def sets(data_cfg, root: Path) -> tuple:
    """(train, val) of ``data=fashion_mnist``; samples (float32 (3, 28, 28), int label).

    ``data.holdout`` = f > 0: the last ceil(f * 6000) training images of each class (file order) are
    the validation set (evaluation transform), else the 10,000 test images are. ``data.train_subset``
    = n > 0: train on the first n images of each class among the rest, else on all of them.
    """
    from torch.utils.data import Subset

    from abnexp.data import holdout_indices  # the package imports this module first

    full = load_split(root, "train")
    targets = full.targets.tolist()
    held = holdout_indices(targets, data_cfg.holdout) if data_cfg.holdout else set()
    kept, seen = [], {}
    for i, c in enumerate(targets):
        if i not in held and (not data_cfg.train_subset or seen.get(c, 0) < data_cfg.train_subset):
            kept.append(i)
            seen[c] = seen.get(c, 0) + 1
    train = Subset(with_transform(full, train_transform(data_cfg.mean, data_cfg.std, data_cfg.padding,
                                                        data_cfg.flip)), kept)
    evaluation = eval_transform(data_cfg.mean, data_cfg.std)
    val = Subset(with_transform(full, evaluation), sorted(held)) if held else test_set(data_cfg, root)
    return train, val


def test_set(data_cfg, root: Path) -> FashionMNIST:
    """The 10,000 test images with the evaluation transform."""
    return with_transform(load_split(root, "test"), eval_transform(data_cfg.mean, data_cfg.std))


def eval_sets(data_cfg, root: Path) -> dict:
    """``abnexp eval``'s protocols: {"center": (28, False, the test set)}, the images at their
    native size (InPlace-ABN's 10-crop and larger-crop protocols are left out on 28 px images)."""
    return {"center": (SIDE, False, test_set(data_cfg, root))}
