"""Semantic segmentation datasets in the layouts they ship in, and their joint image/label transforms.

=================  =====================================================================  =======
data=              layout under data.root (split = train / val)                           classes
=================  =====================================================================  =======
cityscapes         leftImg8bit/<split>/<city>/*_leftImg8bit.png,                          19
                   gtFine/<split>/<city>/*_gtFine_labelIds.png (or *_gtFine_labelTrainIds.png)
coco_stuff         images/<split>2017/*.jpg, annotations/<split>2017/*.png (164k)         171
vistas             <training|validation>/images/*.jpg,                                     65
                   <training|validation>/v1.2/labels/*.png (or .../labels/*.png)
demo_cityscapes    generated in the Cityscapes layout (abnexp/data/demo_cityscapes.py)      19
=================  =====================================================================  =======

Label files hold raw ids; a 256-entry lookup table maps them to train ids on load (values that
are not a class → :data:`IGNORE_INDEX`), so no preprocessing step is needed. Samples are
(image float32 (3, H, W) normalized, label int64 (H, W) with train ids or 255).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from abnexp.data.imagenet import load_rgb
from abnexp.errors import DatasetError

log = logging.getLogger("abnexp")

IGNORE_INDEX = 255  # label value excluded from the loss and the metrics

# Cityscapes labelIds of the 19 train ids, in train-id order (cityscapesScripts, labels.py).
CITYSCAPES_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
                      "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_COLORS = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                     (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                     (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
                     (0, 80, 100), (0, 0, 230), (119, 11, 32))
# COCO-Stuff 164k: PNG value = COCO category id - 1 (things 1-90, stuff 92-182); these ids are unused.
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
COCO_STUFF_CLASSES = tuple((
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,stop sign,"
    "parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,backpack,umbrella,"
    "handbag,tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,"
    "surfboard,tennis racket,bottle,wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,"
    "broccoli,carrot,hot dog,pizza,donut,cake,chair,couch,potted plant,bed,dining table,toilet,tv,laptop,"
    "mouse,remote,keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,book,clock,vase,scissors,"
    "teddy bear,hair drier,toothbrush,banner,blanket,branch,bridge,building-other,bush,cabinet,cage,"
    "cardboard,carpet,ceiling-other,ceiling-tile,cloth,clothes,clouds,counter,cupboard,curtain,desk-stuff,"
    "dirt,door-stuff,fence,floor-marble,floor-other,floor-stone,floor-tile,floor-wood,flower,fog,food-other,"
    "fruit,furniture-other,grass,gravel,ground-other,hill,house,leaves,light,mat,metal,mirror-stuff,moss,"
    "mountain,mud,napkin,net,paper,pavement,pillow,plant-other,plastic,platform,playingfield,railing,"
    "railroad,river,road,rock,roof,rug,salad,sand,sea,shelf,sky-other,skyscraper,snow,solid-other,stairs,"
    "stone,straw,structural-other,table,tent,textile-other,towel,tree,vegetable,wall-brick,wall-concrete,"
    "wall-other,wall-panel,wall-stone,wall-tile,wall-wood,water-other,waterdrops,window-blind,window-other,"
    "wood").split(","))
# Mapillary Vistas v1.2 labels 0-64 (config_v1.2.json); label 65 is "Unlabeled".
VISTAS_CLASSES = tuple((
    "Bird,Ground Animal,Curb,Fence,Guard Rail,Barrier,Wall,Bike Lane,Crosswalk - Plain,Curb Cut,Parking,"
    "Pedestrian Area,Rail Track,Road,Service Lane,Sidewalk,Bridge,Building,Tunnel,Person,Bicyclist,"
    "Motorcyclist,Other Rider,Lane Marking - Crosswalk,Lane Marking - General,Mountain,Sand,Sky,Snow,"
    "Terrain,Vegetation,Water,Banner,Bench,Bike Rack,Billboard,Catch Basin,CCTV Camera,Fire Hydrant,"
    "Junction Box,Mailbox,Manhole,Phone Booth,Pothole,Street Light,Pole,Traffic Sign Frame,Utility Pole,"
    "Traffic Light,Traffic Sign (Back),Traffic Sign (Front),Trash Can,Bicycle,Boat,Bus,Car,Caravan,"
    "Motorcycle,On Rails,Other Vehicle,Trailer,Truck,Wheeled Slow,Car Mount,Ego Vehicle").split(","))


def _lut(raw_ids) -> np.ndarray:
    """(256,) uint8: raw_ids[k] → k, every other value → IGNORE_INDEX."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[list(raw_ids)] = np.arange(len(raw_ids))
    return lut


def _palette(colors=()) -> np.ndarray:
    """(256, 3) uint8: the given colours first, then PASCAL VOC's bit-interleaved colours of
    1, 2, ... (class k gets VOC colour k + 1, never black); IGNORE_INDEX black."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, v = i + 1, [0, 0, 0]
        for bit in range(8):
            for ch in range(3):
                v[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        pal[i] = v
    if colors:
        pal[:len(colors)] = colors
    pal[IGNORE_INDEX] = 0
    return pal


@dataclass(frozen=True)
class LabelKind:
    """One kind of label file: which raw values it may hold and how they map to train ids."""

    name: str  # e.g. "labelIds"
    lut: np.ndarray  # (256,) uint8
    valid: frozenset  # raw values a correct file may contain
    hint: str = ""  # what other values usually mean (abnexp data check)
    expect_any: frozenset = frozenset()  # a split lacking all of these values is suspect (data check)


@dataclass(frozen=True)
class SegSpec:
    """A segmentation dataset: classes, layout and label kinds. ``pairs(root, split)`` returns
    [(image path, label path, label kind name)] and the images without a label file;
    ``labels(root, split)`` every label file of the split (for the orphan check)."""

    name: str
    classes: tuple
    layout: str
    kinds: dict
    pairs: Callable[[Path, str], tuple[list, list]]
    labels: Callable[[Path, str], list]
    palette: np.ndarray

    def samples(self, root: Path, split: str) -> list[tuple[Path, Path, str]]:
        """Image/label pairs of ``split``, sorted.

        Raises:
            DatasetError: a split folder is missing or empty, or images have no label file.
        """
        pairs, missing = self.pairs(Path(root), split)
        if missing:
            raise DatasetError(f"{len(missing)} {split} images of data={self.name} have no label file, e.g. "
                               f"{missing[0]}; expected {self.layout}")
        if not pairs:
            raise DatasetError(f"data.root={root} has no {split} images; expected {self.layout}")
        return pairs


def _pair(images, label_candidates) -> tuple[list, list]:
    pairs, missing = [], []
    for img in images:
        found = next(((p, kind) for p, kind in label_candidates(img) if p.is_file()), None)
        if found:
            pairs.append((img, *found))
        else:
            missing.append(img)
    return pairs, missing


def _cityscapes_pairs(root: Path, split: str):
    def labels(img: Path):
        stem = img.name[:-len("_leftImg8bit.png")]
        folder = root / "gtFine" / split / img.parent.name
        return [(folder / f"{stem}_gtFine_labelTrainIds.png", "labelTrainIds"),
                (folder / f"{stem}_gtFine_labelIds.png", "labelIds")]
    return _pair(sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")), labels)


def _coco_stuff_pairs(root: Path, split: str):
    folder = root / "annotations" / f"{split}2017"
    return _pair(sorted((root / "images" / f"{split}2017").glob("*.jpg")),
                 lambda img: [(folder / f"{img.stem}.png", "stuffthingmaps")])


def _vistas_pairs(root: Path, split: str):
    base = _vistas_dir(root, split)
    return _pair(sorted((base / "images").glob("*.jpg")),
                 lambda img: [(base / "v1.2" / "labels" / f"{img.stem}.png", "v1.2"),
                              (base / "labels" / f"{img.stem}.png", "v1.2")])


def _vistas_dir(root: Path, split: str) -> Path:
    return root / {"train": "training", "val": "validation"}[split]


_COCO_USED = [v for v in range(182) if v + 1 not in COCO_UNUSED_IDS]
CITYSCAPES = SegSpec(
    "cityscapes", CITYSCAPES_CLASSES,
    "<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
    "<root>/gtFine/{train,val}/<city>/*_gtFine_labelIds.png",
    {"labelIds": LabelKind("labelIds", _lut(CITYSCAPES_IDS), frozenset(range(34)),
                           "these look like train ids (0-18, 255): name such files *_gtFine_labelTrainIds.png",
                           frozenset(range(19, 34))),
     "labelTrainIds": LabelKind("labelTrainIds", _lut(range(19)), frozenset([*range(19), IGNORE_INDEX]),
                                "these look like labelIds (0-33): name such files *_gtFine_labelIds.png")},
    _cityscapes_pairs, lambda root, split: sorted((root / "gtFine" / split).glob("*/*_gtFine_label*Ids.png")),
    _palette(CITYSCAPES_COLORS))
COCO_STUFF = SegSpec(
    "coco_stuff", COCO_STUFF_CLASSES,
    "<root>/images/{train2017,val2017}/*.jpg and <root>/annotations/{train2017,val2017}/*.png",
    {"stuffthingmaps": LabelKind("stuffthingmaps", _lut(_COCO_USED), frozenset([*_COCO_USED, IGNORE_INDEX]),
                                 "values of unused COCO ids: these look like already converted 171-class ids "
                                 "(0-170); give the original stuffthingmaps PNGs (COCO id - 1)")},
    _coco_stuff_pairs, lambda root, split: sorted((root / "annotations" / f"{split}2017").glob("*.png")),
    _palette())
VISTAS = SegSpec(
    "vistas", VISTAS_CLASSES,
    "<root>/{training,validation}/images/*.jpg and <root>/{training,validation}/v1.2/labels/*.png",
    {"v1.2": LabelKind("v1.2", _lut(range(65)), frozenset(range(66)),
                       "values above 65: these look like Vistas v2.0 labels (124 classes); use the v1.2 ones")},
    _vistas_pairs, lambda root, split: sorted({*(_vistas_dir(root, split) / "v1.2" / "labels").glob("*.png"),
                                               *(_vistas_dir(root, split) / "labels").glob("*.png")}),
    _palette())

SEGMENTATION = {"cityscapes": CITYSCAPES, "coco_stuff": COCO_STUFF, "vistas": VISTAS,
                "demo_cityscapes": CITYSCAPES}
"""data.name → dataset spec (demo_cityscapes is read as Cityscapes)."""


def read_label(path: Path) -> np.ndarray:
    """Raw ids of a label PNG as a (H, W) uint8 array (palette PNGs give their indices).

    Raises:
        DatasetError: unreadable file, or a colour (RGB) image instead of single-channel ids.
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(f"label {path} is a {img.mode} image: expected single-channel class ids "
                                   f"(not the colour visualisation)")
            arr = np.asarray(img)
    except OSError as e:
        raise DatasetError(f"cannot read label {path}: {e} (remove or replace the file)") from None
    if arr.max(initial=0) > 255:
        raise DatasetError(f"label {path} has values above 255 ({int(arr.max())}): not class ids")
    return arr.astype(np.uint8)


class TrainTransform:
    """Random scale → pad to the crop with the ignore label → random (or class-focused) crop →
    horizontal flip → float32 normalization, applied jointly to the image and its mask.

    Scale: the image is first resized to ``long_side`` (if > 0), then by a factor drawn
    uniformly from ``scale_range``. ``focus`` (a train id) places the crop over a random pixel of
    that class when any is left after scaling (class-uniform sampling); random otherwise.
    Random numbers come from torch's global RNG (seeded per sample by SeededDataset).
    """

    def __init__(self, crop_size: int, scale_range, long_side: int, mean, std):
        self.crop, self.scale_range, self.long_side = crop_size, tuple(scale_range), long_side
        self.mean, self.std = list(mean), list(std)

    def _start(self, size: int, mask_pos: int | None) -> int:
        if mask_pos is None:
            return int(torch.randint(0, size - self.crop + 1, ()))
        lo, hi = max(0, mask_pos - self.crop + 1), min(mask_pos, size - self.crop)
        return int(torch.randint(lo, hi + 1, ()))

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask, focus: int | None = None):
        h, w = image.shape[-2:]
        lo, hi = self.scale_range
        scale = (self.long_side / max(h, w) if self.long_side else 1.0) * float(torch.empty(()).uniform_(lo, hi))
        size = [max(1, round(h * scale)), max(1, round(w * scale))]
        image, mask = F.resize(image, size, antialias=True), F.resize(mask, size)  # masks: nearest
        pad = [0, 0, max(self.crop - size[1], 0), max(self.crop - size[0], 0)]
        if any(pad):
            image, mask = F.pad(image, pad, fill=0), F.pad(mask, pad, fill=IGNORE_INDEX)
        y = x = None
        if focus is not None:
            ys, xs = torch.nonzero(mask == focus, as_tuple=True)
            if len(ys):
                k = int(torch.randint(0, len(ys), ()))
                y, x = int(ys[k]), int(xs[k])
        top, left = self._start(mask.shape[-2], y), self._start(mask.shape[-1], x)
        image, mask = F.crop(image, top, left, self.crop, self.crop), F.crop(mask, top, left, self.crop, self.crop)
        if torch.rand(()) < 0.5:
            image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
        image = F.normalize(F.to_dtype(image, torch.float32, scale=True), self.mean, self.std)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


class EvalTransform:
    """Image resized to ``long_side`` (if > 0) and normalized; the label keeps its stored size."""

    def __init__(self, long_side: int, mean, std):
        self.long_side, self.mean, self.std = long_side, list(mean), list(std)

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask, focus=None):
        if self.long_side:
            h, w = image.shape[-2:]
            s = self.long_side / max(h, w)
            image = F.resize(image, [round(h * s), round(w * s)], antialias=True)
        image = F.normalize(F.to_dtype(image, torch.float32, scale=True), self.mean, self.std)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


class SegmentationDataset(Dataset):
    """Image/label pairs of one split of a segmentation dataset.

    Args:
        spec: the dataset (classes, layout, label kinds).
        root: dataset root. split: "train" or "val".
        transform: TrainTransform or EvalTransform.
        class_uniform: probability that a sample is drawn class-uniformly instead of being image
            ``index`` (InPlace-ABN Table 4): a class uniformly among those present in the split,
            an image containing it, a crop over one of its pixels. Needs a per-image class index,
            computed once and cached under $ABNEXP_CACHE/class_index.

    Raises:
        DatasetError: layout problems (see :meth:`SegSpec.samples`).
    """

    def __init__(self, spec: SegSpec, root: Path, split: str, transform, class_uniform: float = 0.0):
        self.spec, self.root, self.split, self.transform = spec, Path(root), split, transform
        self.samples = spec.samples(self.root, split)
        self.class_uniform = class_uniform
        self.images_of_class: dict[int, list[int]] = self._class_index() if class_uniform > 0 else {}

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        """The image file's stem (e.g. frankfurt_000000_000294_leftImg8bit)."""
        return self.samples[index][0].stem

    def label(self, index: int) -> np.ndarray:
        """(H, W) uint8 train ids (IGNORE_INDEX elsewhere) of sample ``index``."""
        _, path, kind = self.samples[index]
        return self.spec.kinds[kind].lut[read_label(path)]

    def _class_index(self) -> dict[int, list[int]]:
        from abnexp.data.demo import cache_dir

        key = hashlib.sha1(f"{self.root.resolve()}|{self.split}|{len(self)}".encode()).hexdigest()[:16]
        path = cache_dir() / "class_index" / f"{self.spec.name}_{self.split}_{key}.json"
        if path.is_file():
            return {int(k): v for k, v in json.loads(path.read_text()).items()}
        log.info("class-uniform sampling: indexing the classes of %d %s labels (once, cached in %s)",
                 len(self), self.split, path)
        index: dict[int, list[int]] = {}
        for i in range(len(self)):
            for c in np.unique(self.label(i)):
                if c != IGNORE_INDEX:
                    index.setdefault(int(c), []).append(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{torch.randint(0, 2**31, ()).item()}")
        tmp.write_text(json.dumps(index))
        tmp.replace(path)
        return index

    def __getitem__(self, index: int):
        focus = None
        if self.images_of_class and float(torch.rand(())) < self.class_uniform:
            classes = sorted(self.images_of_class)
            focus = classes[int(torch.randint(0, len(classes), ()))]
            candidates = self.images_of_class[focus]
            index = candidates[int(torch.randint(0, len(candidates), ()))]
        image = tv_tensors.Image(F.pil_to_tensor(load_rgb(str(self.samples[index][0]))))  # uint8 (3, H, W)
        label = self.label(index)
        if tuple(label.shape) != tuple(image.shape[-2:]):
            raise DatasetError(f"label {self.samples[index][1]} is {label.shape[1]}x{label.shape[0]} but its image "
                               f"is {image.shape[-1]}x{image.shape[-2]}: mismatched pair")
        return self.transform(image, tv_tensors.Mask(torch.from_numpy(label)), focus)


def check_seg_root(name: str, root) -> Path:
    """The root folder of segmentation dataset ``name``; raises DatasetError (with the expected
    layout) when it is unset or not a folder. Pairing is checked when a split is loaded."""
    spec = SEGMENTATION[name]
    if root is None or str(root) in ("", "???"):
        raise DatasetError(f"data.root is not set for data={name}: pass data.root=PATH with the layout "
                           f"{spec.layout}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data.root={root} does not exist or is not a folder; expected {spec.layout}")
    return root


def segmentation_sets(data_cfg, root: Path) -> tuple[SegmentationDataset, SegmentationDataset]:
    """(train, val) datasets of ``data_cfg`` (data=cityscapes|coco_stuff|vistas|demo_cityscapes)."""
    d = data_cfg
    spec = SEGMENTATION[d.name]
    train = SegmentationDataset(spec, root, "train",
                                TrainTransform(d.crop_size, d.scale_range, d.long_side, d.mean, d.std),
                                class_uniform=d.class_uniform)
    val = SegmentationDataset(spec, root, "val", EvalTransform(d.long_side, d.mean, d.std))
    return train, val
