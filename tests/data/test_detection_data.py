"""COCO loading (category mapping, crowd / degenerate boxes, empty images, flips), aspect-ratio
batching with exact resume, and the generated demo_coco dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from abnexp.data.coco import AspectRatioBatchSampler, CocoDetection, check_coco_root
from abnexp.data.sampling import ResumableSampler
from abnexp.errors import DatasetError

pytest.importorskip("pycocotools")

W, H = 64, 48


def write_coco(root: Path) -> Path:
    """Images: 1 = a normal box (cat 90), a crowd RLE (cat 5), a degenerate box (cat 2) and a box
    running past the right edge (cat 5); 2 = no annotation; 3 = only a crowd annotation; 4 = a
    portrait image with one box (cat 2). Category ids 2, 5, 90 are non-contiguous and listed unsorted."""
    from pycocotools import mask as mask_util

    crowd = np.zeros((H, W), dtype=np.uint8, order="F")
    crowd[30:40, 5:25] = 1
    rle = mask_util.encode(crowd)
    rle["counts"] = rle["counts"].decode("ascii")
    rect = lambda x, y, w, h: [[x, y, x + w, y, x + w, y + h, x, y + h]]  # noqa: E731
    anns = [
        {"id": 1, "image_id": 1, "category_id": 90, "bbox": [10, 5, 20, 10], "segmentation": rect(10, 5, 20, 10),
         "area": 200, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [5, 30, 20, 10], "segmentation": rle, "area": 200,
         "iscrowd": 1},
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [40, 20, 0, 8], "segmentation": rect(40, 20, 0, 8),
         "area": 0, "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 5, "bbox": [50, 20, 30, 10], "segmentation": rect(50, 20, 14, 10),
         "area": 140, "iscrowd": 0},
        {"id": 5, "image_id": 3, "category_id": 5, "bbox": [5, 30, 20, 10], "segmentation": rle, "area": 200,
         "iscrowd": 1},
        {"id": 6, "image_id": 4, "category_id": 2, "bbox": [4, 4, 10, 10], "segmentation": rect(4, 4, 10, 10),
         "area": 100, "iscrowd": 0},
    ]
    images = [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in (1, 2, 3)]
    images.append({"id": 4, "file_name": "4.png", "width": H, "height": W})
    content = {"images": images, "annotations": anns,
               "categories": [{"id": c, "name": f"c{c}"} for c in (90, 2, 5)]}
    (root / "annotations").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(content))
        (root / f"{split}2017").mkdir()
        for im in images:
            pixels = rng.integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{split}2017" / im["file_name"])
    return root


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco"))


def test_categories_map_to_contiguous_labels(coco_root):
    ds = CocoDetection(coco_root, "val", train=False, masks=False)
    assert ds.cat_ids == [2, 5, 90] and ds.num_classes == 3  # label l <-> cat_ids[l - 1]
    _, target = ds[0]  # image 1
    # kept: box 1 (cat 90 -> label 3) and box 4 (cat 5 -> label 2, clipped at x = 64);
    # dropped: the crowd region and the zero-width box
    assert target["labels"].tolist() == [3, 2]
    assert target["boxes"].tolist() == [[10, 5, 30, 15], [50, 20, 64, 30]]
    assert type(target["boxes"]) is torch.Tensor  # plain tensors, not tv_tensors


def test_training_drops_images_without_a_usable_box(coco_root):
    val = CocoDetection(coco_root, "val", train=False, masks=False)
    train = CocoDetection(coco_root, "train", train=True, masks=True)
    assert val.ids == [1, 2, 3, 4]  # evaluation keeps every image, empty ones included
    assert train.ids == [1, 4]  # no annotation (2) and crowd-only (3) images are not trained on
    assert train.aspect_groups() == [0, 1]
    image, target = val[1]  # image 2: empty target of the right shapes
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["image_id"] == 2


def test_masks_and_horizontal_flip(coco_root):
    ds = CocoDetection(coco_root, "train", train=True, masks=True)
    reference = np.asarray(Image.open(coco_root / "train2017" / "1.png"), dtype=np.float32) / 255
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        image, target = ds[0]
        flipped = not np.allclose(image.permute(1, 2, 0).numpy(), reference, atol=1e-6)
        seen.add(flipped)
        masks = target["masks"]
        assert masks.shape == (2, H, W) and masks.dtype == torch.uint8
        assert 190 <= int(masks[0].sum()) <= 210  # the 20x10 polygon, rasterized by pycocotools
        for box, mask in zip(target["boxes"], masks):  # boxes follow the (possibly flipped) masks
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert abs(xs.min().item() - box[0].item()) <= 1 and abs(xs.max().item() + 1 - box[2].item()) <= 1
        expected = [10, 5, 30, 15] if not flipped else [W - 30, 5, W - 10, 15]
        assert target["boxes"][0].tolist() == expected
        if flipped:
            assert np.allclose(image.permute(1, 2, 0).numpy(), reference[:, ::-1], atol=1e-6)
    assert seen == {False, True}


def test_root_errors(tmp_path, coco_root):
    with pytest.raises(DatasetError, match="data.root"):
        check_coco_root(None)
    with pytest.raises(DatasetError, match="instances_train2017.json"):
        check_coco_root(tmp_path)
    assert check_coco_root(coco_root) == coco_root


class ToySet(torch.utils.data.Dataset):
    def __len__(self):
        return 23


@pytest.mark.parametrize("world_size", [1, 2])
def test_aspect_ratio_batches_resume_exactly(world_size):
    groups = [int(i % 3 == 0) for i in range(23)]
    for rank in range(world_size):
        sampler = ResumableSampler(ToySet(), seed=1, num_replicas=world_size, rank=rank)
        batcher = AspectRatioBatchSampler(sampler, groups, batch_size=2)
        sampler.set_epoch(3)
        full = list(batcher)
        order = list(sampler.sampler)
        assert len(full) == len(order) // 2 == len(batcher)
        used = [i for b in full for i in b]
        assert len(used) == len(set(used)) and set(used) <= set(order)  # no index twice in an epoch
        # all but the last (leftover) batch hold one aspect-ratio group
        assert sum(len({groups[i] for i in b}) > 1 for b in full) <= 1
        sampler.set_epoch(3, start=3 * 2)  # resumed after 3 optimizer steps
        assert list(batcher) == full[3:] and len(batcher) == len(full) - 3
        sampler.set_epoch(4)
        assert list(batcher) != full  # another epoch, another order


def test_demo_coco_layout_and_content(demo_cache):
    from pycocotools.coco import COCO

    from abnexp.data.demo_coco import COUNTS, ensure_demo_coco

    root = ensure_demo_coco()
    assert root.parent == Path(demo_cache)
    for split, count in COUNTS.items():
        coco = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
        assert len(coco.imgs) == count and sorted(coco.getCatIds()) == [1, 2, 3, 4]
        assert any(not coco.imgToAnns[i] for i in coco.imgs)  # at least one image without objects
        assert {im["width"] >= im["height"] for im in coco.imgs.values()} == {True, False}
        for a in coco.anns.values():
            im = coco.imgs[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"]
            assert abs(int(coco.annToMask(a).sum()) - a["area"]) <= 1
        for im in list(coco.imgs.values())[:3]:
            assert Image.open(root / f"{split}2017" / im["file_name"]).size == (im["width"], im["height"])


def test_demo_coco_is_deterministic(demo_cache, tmp_path):
    from abnexp.data.demo_coco import ensure_demo_coco

    a, b = ensure_demo_coco(), ensure_demo_coco(tmp_path / "again")
    for name in ("annotations/instances_val2017.json", "val2017/000000100002.jpg"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
