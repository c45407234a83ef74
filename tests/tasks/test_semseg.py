"""Segmentation pieces against independent references: hand-computed confusion matrices and
IoUs, models whose outputs are known, torch's own cross-entropy / BatchNorm layers, and label
files written with known raw values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import tv_tensors

from abnexp.data.segmentation import (CITYSCAPES, COCO_STUFF, IGNORE_INDEX, VISTAS, EvalTransform,
                                      SegmentationDataset, TrainTransform)
from abnexp.errors import DatasetError
from abnexp.eval.segmentation import confusion_matrix, forward_logits, predict, scores

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


# --- metrics ---------------------------------------------------------------------------------

def test_confusion_matrix_and_scores_hand_computed():
    # 4 classes; class 3 never occurs (no IoU); 255 pixels are ignored whatever is predicted.
    target = torch.tensor([[0, 0, 1, 1, 255],
                           [2, 2, 2, 0, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 3],
                         [2, 2, 0, 0, 0]])
    cm = confusion_matrix(pred, target, 4)
    expected = torch.tensor([[2, 1, 0, 0],   # gt 0: predicted 0, 1, 0
                             [0, 2, 0, 0],   # gt 1: predicted 1, 1
                             [1, 0, 2, 0],   # gt 2: predicted 2, 2, 0
                             [0, 0, 0, 0]])
    assert torch.equal(cm, expected)
    s = scores(cm, ["a", "b", "c", "d"])
    # IoU = TP / (TP + FP + FN): a 2/(3+3-2) = 0.5, b 2/(2+3-2) = 2/3, c 2/(3+2-2) = 2/3, d none
    assert s["iou"]["a"] == pytest.approx(50.0)
    assert s["iou"]["b"] == pytest.approx(200 / 3)
    assert s["iou"]["c"] == pytest.approx(200 / 3)
    assert s["iou"]["d"] is None
    assert s["miou"] == pytest.approx((50 + 200 / 3 + 200 / 3) / 3)
    assert s["pixel_acc"] == pytest.approx(100 * 6 / 8)
    assert s["mean_acc"] == pytest.approx(100 * (2 / 3 + 1 + 2 / 3) / 3)
    assert s["num_pixels"] == 8


def test_predicted_but_absent_class_counts_as_zero():
    cm = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 0]), 2)
    s = scores(cm, ["a", "b"])
    assert s["iou"] == {"a": pytest.approx(100 / 3), "b": 0.0}  # b: union 2, no true positive
    assert s["miou"] == pytest.approx(100 / 6)


# --- inference: multi-scale, flip, sliding window on models with known outputs ----------------

class WidthLogit(nn.Module):
    """Logits (N, 2, H, W): class 0 = 0, class 1 = log(W) at every pixel (W = input width)."""

    def forward(self, x):
        n, _, h, w = x.shape
        out = torch.zeros(n, 2, h, w)
        out[:, 1] = math.log(w)
        return out


class ColumnRamp(nn.Module):
    """Logits (N, 2, H, W): class 0 = 0, class 1 = column index (depends on position, not content)."""

    def forward(self, x):
        n, _, h, w = x.shape
        out = torch.zeros(n, 2, h, w)
        out[:, 1] = torch.arange(w, dtype=torch.float32)
        return out


def test_multi_scale_probabilities_are_averaged():
    image = torch.randn(1, 3, 10, 20)
    probs = predict(WidthLogit(), image, scales=(0.5, 1.0, 1.5))
    # widths 10, 20, 30 -> p(class 1) = W / (1 + W) at each scale, averaged
    expected = (10 / 11 + 20 / 21 + 30 / 31) / 3
    assert probs.shape == (1, 2, 10, 20)
    assert torch.allclose(probs[:, 1], torch.full((1, 10, 20), expected), atol=1e-6)


def test_flipped_output_is_flipped_back_before_averaging():
    image = torch.randn(1, 3, 4, 5)
    probs = predict(ColumnRamp(), image, scales=(1.0,), flip=True)
    ramp = torch.arange(5, dtype=torch.float32)
    # identity pass: sigmoid(col); flipped pass, flipped back: sigmoid(4 - col)
    expected = (torch.sigmoid(ramp) + torch.sigmoid(4 - ramp)) / 2
    assert torch.allclose(probs[0, 1], expected.expand(4, 5), atol=1e-6)


def test_sliding_window_matches_whole_image_for_a_pointwise_model():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)  # per-pixel: any window sees the same values as the whole image
    x = torch.randn(1, 3, 23, 37)
    with torch.no_grad():
        whole = model(x)
        windowed = forward_logits(model, x, window=16, overlap=0.5)
        small = forward_logits(model, torch.randn(1, 3, 9, 40), window=16)  # padded to the window height
    assert torch.allclose(windowed, whole, atol=1e-6)
    assert small.shape == (1, 4, 9, 40)


def test_sliding_window_averages_overlaps():
    # ColumnRamp sees window-local columns: every output column is the mean of its local indices.
    x = torch.zeros(1, 3, 4, 10)
    out = forward_logits(ColumnRamp(), x, window=6, overlap=0.5)  # stride 3: windows at 0, 3, 4
    windows = [0, 3, 4]
    expected = torch.tensor([np.mean([c - s for s in windows if s <= c < s + 6]) for c in range(10)],
                            dtype=torch.float32)
    assert torch.allclose(out[0, 1, 0], expected)


# --- model ---------------------------------------------------------------------------------

def _deeplab(norm: str, output_stride: int = 16):
    from abnexp.models import build_model
    from abnexp.models.deeplab import DeepLabV3
    from abnexp.norm import build_norm_act

    torch.manual_seed(0)
    na = build_norm_act(norm)
    return DeepLabV3(build_model("resnet18", na, num_classes=1, output_stride=output_stride), 5, na, channels=16)


def test_deeplab_shapes_rates_and_no_unused_parameters():
    from abnexp.models.heads import ClassificationHead

    model = _deeplab("bn", 8)
    assert [m.dilation[0] for m in model.head.map_convs] == [1, 12, 24, 36]
    assert [m.dilation[0] for m in _deeplab("bn", 16).head.map_convs] == [1, 6, 12, 18]
    assert not any(isinstance(m, ClassificationHead) for m in model.modules())
    x = torch.randn(2, 3, 33, 47)
    out = model(x)
    assert out.shape == (2, 5, 33, 47)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP needs no find_unused_parameters


def test_deeplab_inplace_abn_matches_bn():
    """InPlace-ABN in backbone and head: same outputs and gradients as ABN with the same weights."""
    ref, ipabn = _deeplab("bn"), _deeplab("inplace_abn")
    ipabn.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 40, 40)
    outs = []
    for model in (ref, ipabn):
        out = model(x)
        out.square().mean().backward()
        outs.append(out.detach())
    assert torch.allclose(outs[0], outs[1], atol=1e-4)
    for (name, a), b in zip(ref.named_parameters(), ipabn.parameters()):
        # float32 through ~20 small-batch norms (the inversion of z costs a few ulps per layer);
        # a corrupted in-place buffer would differ at O(1)
        assert (a.grad - b.grad).abs().max() <= 5e-3 * a.grad.abs().max(), name


def test_head_keeps_less_for_backward_with_inplace_abn():
    from abnexp.memory import SavedBytes
    from abnexp.models.deeplab import DeepLabV3Head
    from abnexp.norm import build_norm_act

    kept = {}
    for norm in ("bn", "inplace_abn"):
        head = DeepLabV3Head(32, 16, build_norm_act(norm))
        x = torch.randn(2, 32, 12, 12)
        with SavedBytes(exclude=[*head.parameters(), x]) as saved:
            head(x)
        kept[norm] = saved.total
    # bn keeps norm input and output of map_bn (64 ch) and red_bn (16 ch); InPlace-ABN one buffer each
    assert kept["inplace_abn"] < 0.7 * kept["bn"]


def test_pretrained_backbone_loading(tmp_path):
    from abnexp.models import build_model
    from abnexp.models.pretrained import load_backbone
    from abnexp.norm import build_norm_act

    torch.manual_seed(1)
    cls = build_model("resnet18", build_norm_act("bn"), num_classes=7)
    torch.save({"model": cls.state_dict(), "config": "model:\n  name: resnet18\n"}, tmp_path / "cls.pt")
    seg = _deeplab("bn")
    report = load_backbone(seg.backbone, tmp_path / "cls.pt", strict=False)
    assert report["dropped_head"] == ["fc.bias", "fc.weight"] and not report["missing"]
    assert torch.equal(seg.backbone.layer1[0].conv1.weight, cls.layer1[0].conv1.weight)
    assert torch.equal(seg.backbone.bn1.running_var, cls.bn1.running_var)
    other = build_model("resnext50", build_norm_act("bn"), num_classes=7).state_dict()
    torch.save({"model": other, "config": "model:\n  name: resnext50\n"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="none of its"):
        load_backbone(_deeplab("bn").backbone, tmp_path / "other.pt", strict=False)


# --- data ----------------------------------------------------------------------------------

def _write(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


def test_cityscapes_label_ids_mapped_to_train_ids(tmp_path):
    raw = np.array([[0, 7, 8, 11], [26, 33, 34, 1]])  # unlabeled, road, sidewalk, building / car, bicycle, -, ego
    for split in ("train", "val"):
        _write(tmp_path / f"leftImg8bit/{split}/ulm/ulm_000000_000001_leftImg8bit.png", np.zeros((2, 4, 3)))
        _write(tmp_path / f"gtFine/{split}/ulm/ulm_000000_000001_gtFine_labelIds.png", raw)
    # a second image with train ids already: used as they are
    _write(tmp_path / "leftImg8bit/train/ulm/ulm_000000_000002_leftImg8bit.png", np.zeros((2, 4, 3)))
    _write(tmp_path / "gtFine/train/ulm/ulm_000000_000002_gtFine_labelTrainIds.png", [[0, 18, 255, 5]] * 2)
    ds = SegmentationDataset(CITYSCAPES, tmp_path, "train", EvalTransform(0, MEAN, STD))
    assert ds.label(0).tolist() == [[255, 0, 1, 2], [13, 18, 255, 255]]
    assert ds.label(1).tolist() == [[0, 18, 255, 5]] * 2
    image, label = ds[0]
    assert image.shape == (3, 2, 4) and label.dtype == torch.int64
    (tmp_path / "gtFine/train/ulm/ulm_000000_000002_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(DatasetError, match="ulm_000000_000002_leftImg8bit.png"):
        SegmentationDataset(CITYSCAPES, tmp_path, "train", EvalTransform(0, MEAN, STD))


def test_coco_stuff_and_vistas_label_maps(tmp_path):
    coco = tmp_path / "coco"
    _write(coco / "images/val2017/000000000001.jpg", np.zeros((1, 5, 3)))
    # values are COCO id - 1: person (id 1), unused id 12, stop sign (13), wall-wood (177 of 182), unlabeled
    _write(coco / "annotations/val2017/000000000001.png", [[0, 11, 12, 181, 255]])
    ds = SegmentationDataset(COCO_STUFF, coco, "val", EvalTransform(0, MEAN, STD))
    assert ds.label(0).tolist() == [[0, 255, 11, 170, 255]]
    assert COCO_STUFF.classes[11] == "stop sign" and COCO_STUFF.classes[170] == "wood"
    vistas = tmp_path / "vistas"
    _write(vistas / "validation/images/a.jpg", np.zeros((1, 3, 3)))
    palette_label = Image.fromarray(np.array([[0, 64, 65]], dtype=np.uint8), mode="P")
    palette_label.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])  # indices, not colours, count
    (vistas / "validation/v1.2/labels").mkdir(parents=True)
    palette_label.save(vistas / "validation/v1.2/labels/a.png")
    ds = SegmentationDataset(VISTAS, vistas, "val", EvalTransform(0, MEAN, STD))
    assert ds.label(0).tolist() == [[0, 64, 255]]


def test_colour_label_is_rejected(tmp_path):
    _write(tmp_path / "images/val2017/1.jpg", np.zeros((2, 2, 3)))
    _write(tmp_path / "annotations/val2017/1.png", np.zeros((2, 2, 3)))
    ds = SegmentationDataset(COCO_STUFF, tmp_path, "val", EvalTransform(0, MEAN, STD))
    with pytest.raises(DatasetError, match="RGB image"):
        ds[0]


def _image_encoding_label(label: np.ndarray) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """Image whose red channel is 10 x label: alignment after a transform is checkable."""
    img = np.zeros((3, *label.shape), dtype=np.uint8)
    img[0] = label * 10
    return tv_tensors.Image(torch.from_numpy(img)), tv_tensors.Mask(torch.from_numpy(label))


def test_train_transform_keeps_image_and_label_aligned_and_pads_with_ignore():
    label = np.arange(20 * 12, dtype=np.uint8).reshape(20, 12) % 20
    image, mask = _image_encoding_label(label)
    tf = TrainTransform(16, (1.0, 1.0), 0, MEAN, STD)  # no rescaling: crop, pad, flip only
    for seed in range(10):
        torch.manual_seed(seed)
        x, y = tf(image, mask)
        assert x.shape == (3, 16, 16) and y.shape == (16, 16) and y.dtype == torch.int64
        red = torch.round((x[0] * STD[0] + MEAN[0]) * 255)
        valid = y != IGNORE_INDEX
        assert torch.equal(red[valid], (y[valid] * 10).float())  # the image moved with its label
        assert (~valid).sum() == 16 * 4  # width 12 padded to 16 with the ignore label


def test_train_transform_random_scale_range_and_focus_class():
    label = np.zeros((64, 64), dtype=np.uint8)
    label[60, 2] = 7  # one pixel of class 7 in a corner
    image, mask = _image_encoding_label(label)
    tf = TrainTransform(8, (1.0, 1.0), 0, MEAN, STD)
    for seed in range(20):
        torch.manual_seed(seed)
        assert (tf(image, mask, focus=7)[1] == 7).any()
    sizes = set()
    tf = TrainTransform(200, (0.5, 2.0), 0, MEAN, STD)  # crop larger than any scaled image: padding shows size
    for seed in range(20):
        torch.manual_seed(seed)
        y = tf(image, mask)[1]
        assert set(y.unique().tolist()) <= {0, 7, IGNORE_INDEX}  # labels resized by nearest neighbour
        sizes.add(int((y != IGNORE_INDEX).sum().sqrt().round()))
    assert min(sizes) >= 32 and max(sizes) <= 128 and len(sizes) > 5


def test_class_uniform_sampling_visits_rare_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("ABNEXP_CACHE", str(tmp_path / "cache"))
    for i in range(4):  # class 2 (building, labelId 11) only in image 3, in a 2x2 patch
        raw = np.full((32, 32), 7)
        if i == 3:
            raw[5:7, 20:22] = 11
        _write(tmp_path / f"d/leftImg8bit/train/ulm/ulm_000000_{i:06d}_leftImg8bit.png", np.zeros((32, 32, 3)))
        _write(tmp_path / f"d/gtFine/train/ulm/ulm_000000_{i:06d}_gtFine_labelIds.png", raw)
    tf = TrainTransform(8, (1.0, 1.0), 0, MEAN, STD)
    ds = SegmentationDataset(CITYSCAPES, tmp_path / "d", "train", tf, class_uniform=1.0)
    assert ds.images_of_class == {0: [0, 1, 2, 3], 2: [3]}
    assert list((tmp_path / "cache" / "class_index").glob("cityscapes_train_*.json"))
    hits = 0
    for seed in range(40):
        torch.manual_seed(seed)
        hits += bool((ds[0][1] == 2).any())
    # class drawn uniformly from {0, 2}: about half the crops hold the rare class (random crops: ~0.6 %)
    assert 10 <= hits <= 30


def test_loss_ignores_pixels_and_survives_an_all_ignored_batch():
    from abnexp.config import compose
    from abnexp.tasks import RunContext
    from abnexp.tasks.semseg import SegmentationTask

    task = SegmentationTask(compose(["task=semseg"]))
    logits = torch.randn(2, 19, 4, 4)
    model = lambda x: logits  # noqa: E731
    labels = torch.randint(0, 19, (2, 4, 4))
    labels[0, :2] = IGNORE_INDEX
    loss, n = task.loss(model, (torch.zeros(2, 3, 4, 4), labels), RunContext())
    assert n == 2 and loss.item() == pytest.approx(F.cross_entropy(logits, labels, ignore_index=255).item())
    loss, _ = task.loss(model, (torch.zeros(2, 3, 4, 4), torch.full((2, 4, 4), 255)), RunContext())
    assert loss.item() == 0.0


# --- evaluation over processes ------------------------------------------------------------------

class _Pairs(torch.utils.data.Dataset):
    """7 deterministic (image, label) pairs of 3 classes (some pixels ignored); names for export."""

    def __len__(self):
        return 7

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        label = torch.randint(0, 3, (6, 9), generator=g)
        label[0, :i] = IGNORE_INDEX
        return torch.randn(3, 6, 9, generator=g), label


def _evaluate_shard(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from abnexp.data.sampling import ShardSampler
    from abnexp.eval.segmentation import evaluate, single_image_loader

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    loader = DataLoader(_Pairs(), batch_size=1, sampler=ShardSampler(7, world, rank))
    r = evaluate(nn.Conv2d(3, 3, 1), single_image_loader(loader), torch.device("cpu"), 3, "abc")
    torch.save({k: r[k] for k in ("miou", "pixel_acc", "num_images", "num_pixels")}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_confusion_matrix_is_summed_over_processes(tmp_path):
    """Two gloo processes, each on its shard, report what one pass over every image computes by hand."""
    import torch.multiprocessing as mp

    mp.spawn(_evaluate_shard, args=(2, str(tmp_path / "pg"), str(tmp_path / "r")), nprocs=2)
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 1)
    cm = torch.zeros(3, 3, dtype=torch.int64)
    with torch.no_grad():
        for image, label in (_Pairs()[i] for i in range(7)):
            pred = model(image[None]).argmax(1)[0]
            for t, p in zip(label.flatten().tolist(), pred.flatten().tolist()):
                if t != IGNORE_INDEX:
                    cm[t, p] += 1
    iou = [cm[c, c].item() / (cm[c].sum() + cm[:, c].sum() - cm[c, c]).item() for c in range(3)]
    for rank in range(2):
        r = torch.load(tmp_path / f"r.{rank}")
        assert r["num_images"] == 7 and r["num_pixels"] == cm.sum().item()
        assert r["miou"] == pytest.approx(100 * sum(iou) / 3)
        assert r["pixel_acc"] == pytest.approx(100 * cm.diag().sum().item() / cm.sum().item())
