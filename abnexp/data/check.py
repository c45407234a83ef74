"""Dataset checks behind ``abnexp data check`` (abnexp.commands.data): validate a dataset before
hours are spent training on it.

Segmentation datasets (cityscapes, coco_stuff, vistas, demo_cityscapes), both splits:
images and label files paired both ways (no image without a label, no label without an image);
every label file readable, single-channel, of its image's size, and holding only the raw values
its kind allows (the message says what wrong values usually mean: train ids given where labelIds
are expected and vice versa, converted COCO-Stuff ids, Vistas v2.0 labels); per-class pixel
counts after mapping to train ids. Datasets with a reader (Fashion-MNIST): images per split and
class, after the reader's file checks. ImageNet-layout folders (imagenet, demo): their layout check,
then images and class folders per split. Other datasets: their layout check. Problems → exit status 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from abnexp.data import DATASETS, ClassificationData, dataset_root
from abnexp.data.imagenet import folder_counts
from abnexp.data.segmentation import IGNORE_INDEX, SEGMENTATION, SegSpec, read_label
from abnexp.errors import DatasetError


def _base(path: Path) -> str:
    """Image/label pairing key: the file stem without Cityscapes' _leftImg8bit / _gtFine_* suffixes."""
    return path.stem.split("_gtFine_")[0].removesuffix("_leftImg8bit")


def check_split(spec: SegSpec, root: Path, split: str, max_images: int = 0) -> tuple[list[str], np.ndarray, int]:
    """Problems (messages), per-class pixel counts (len(spec.classes),) int64 and ignored pixels of one split."""
    problems = []
    pairs, missing = spec.pairs(root, split)
    if not pairs and not missing:
        return [f"{split}: no images found; expected {spec.layout}"], np.zeros(len(spec.classes), np.int64), 0
    if missing:
        problems.append(f"{split}: {len(missing)} images without a label file, e.g. {missing[0]}")
    images = {_base(p) for p, _, _ in pairs} | {_base(p) for p in missing}
    orphans = [p for p in spec.labels(root, split) if _base(p) not in images]
    if orphans:
        problems.append(f"{split}: {len(orphans)} label files without an image, e.g. {orphans[0]}")
    raw = {kind: np.zeros(256, np.int64) for kind in spec.kinds}
    bad_files = {kind: [] for kind in spec.kinds}
    for image, label, kind in pairs[:max_images or None]:
        try:
            values = read_label(label)
            with Image.open(image) as img:
                size = img.size
        except (DatasetError, OSError) as e:
            problems.append(f"{split}: {e}")
            continue
        if (values.shape[1], values.shape[0]) != size:
            problems.append(f"{split}: {label} is {values.shape[1]}x{values.shape[0]} but {image.name} is "
                            f"{size[0]}x{size[1]}")
        counts = np.bincount(values.ravel(), minlength=256)
        raw[kind] += counts
        if set(np.flatnonzero(counts)) - spec.kinds[kind].valid:
            bad_files[kind].append(label)
    for kind, files in bad_files.items():
        if files:
            wrong = sorted(set(np.flatnonzero(raw[kind])) - spec.kinds[kind].valid)
            problems.append(f"{split}: {len(files)} {kind} files hold values outside the expected set "
                            f"({_ranges(spec.kinds[kind].valid)}): {_ranges(wrong)}, e.g. {files[0]}; "
                            f"{spec.kinds[kind].hint}")
    for kind, k in spec.kinds.items():
        if raw[kind].any() and k.expect_any and not raw[kind][sorted(k.expect_any)].any():
            problems.append(f"{split}: no {kind} file holds any of {_ranges(k.expect_any)}; {k.hint}")
    classes = np.zeros(len(spec.classes), np.int64)
    ignored = 0
    for kind, k in spec.kinds.items():
        mapped = np.bincount(k.lut, weights=raw[kind], minlength=256).astype(np.int64)
        classes += mapped[:len(spec.classes)]
        ignored += int(mapped[IGNORE_INDEX])
    return problems, classes, ignored


def _ranges(values) -> str:
    """'0-18, 255' for {0, ..., 18, 255}."""
    values, parts, start = sorted(int(v) for v in values), [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def check_dataset(name: str, root, max_images: int = 0) -> tuple[bool, str]:
    """(ok, report) for dataset ``name`` at ``root`` (see the module docstring).

    Raises:
        ConfigError / DatasetError: unknown dataset, or a root that is missing / not a folder.
    """
    root = dataset_root(name, root)
    if DATASETS[name].reader is not None:
        return True, DATASETS[name].reader.report(root)
    if DATASETS[name].options is ClassificationData:  # ImageNet-layout folders: what ImageFolder will read
        counts = folder_counts(root)
        return True, "\n".join([f"data={name} at {root}: layout check passed"] + [
            f"{split}: {images:,} images in {classes:,} class folders" for split, (classes, images) in counts.items()])
    if name not in SEGMENTATION:
        return True, f"data={name} at {root}: layout check passed (label checks exist for segmentation datasets)"
    spec = SEGMENTATION[name]
    lines, problems = [f"data={name} at {root}"], []
    table = {}
    for split in ("train", "val"):
        p, classes, ignored = check_split(spec, root, split, max_images)
        problems += p
        table[split] = (classes, ignored)
        n = len(spec.pairs(root, split)[0])
        lines.append(f"{split}: {n} image/label pairs" + (f" ({min(n, max_images)} checked)" if max_images else ""))
    lines += ["", "| class | train pixels | val pixels |", "|---|---|---|"]
    for c, cls in enumerate(spec.classes):
        lines.append(f"| {c} {cls} | {table['train'][0][c]} | {table['val'][0][c]} |")
    lines.append(f"| ignored ({IGNORE_INDEX}) | {table['train'][1]} | {table['val'][1]} |")
    absent = [cls for c, cls in enumerate(spec.classes) if table["train"][0][c] == 0]
    if absent and table["train"][0].any():
        lines.append(f"\nwarning: {len(absent)} classes have no training pixels: {', '.join(absent)}")
    lines += [""] + ([f"problem: {p}" for p in problems] or ["no problems found"])
    return not problems, "\n".join(lines)
