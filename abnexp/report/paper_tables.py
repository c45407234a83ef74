"""The papers' tables: title, rows and columns as printed, and where each cell's number is
found in a run's ``eval.json``.

An experiment config (configs/experiment/*.yaml) names its table, its row and — for tables
whose cells come from different runs (InPlace-ABN Table 3) — its column, and carries the
paper's numbers under ``experiment.reported`` keyed by column label.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    label: str  # as printed in the paper
    metric: str  # dotted path into eval.json, e.g. "protocols.center.top1"; "100-<path>" = an error rate


@dataclass(frozen=True)
class PaperTable:
    key: str  # experiment.table
    title: str
    rows: tuple[str, ...]
    columns: tuple[Column, ...]
    note: str = ""


_IMAGENET_3 = (
    Column("224² center top-1", "protocols.center.top1"), Column("224² center top-5", "protocols.center.top5"),
    Column("224² 10-crops top-1", "protocols.ten_crop.top1"), Column("224² 10-crops top-5", "protocols.ten_crop.top5"),
    Column("320² center top-1", "protocols.large_center.top1"),
    Column("320² center top-5", "protocols.large_center.top5"))
_MIOU = "protocols.single_scale.miou"
_BOX = ("AP", "AP50", "AP75", "APs", "APm", "APl")

TABLES: dict[str, PaperTable] = {t.key: t for t in (
    PaperTable("inplace_abn_sup_t1", "InPlace-ABN supplementary Table 1: ReLU vs Leaky ReLU, ResNeXt-101 on "
               "ImageNet (training activation / validation activation)",
               ("ReLU / ReLU", "ReLU / Leaky ReLU", "Leaky ReLU / Leaky ReLU", "Leaky ReLU / ReLU"), _IMAGENET_3),
    PaperTable("inplace_abn_t2", "InPlace-ABN Table 2: ImageNet validation, top-1/top-5 [%]",
               ("ResNeXt-101, std-BN (batch 256)", "ResNeXt-101, InPlace-ABN (batch 512)",
                "ResNeXt-152, InPlace-ABN (batch 256)", "WideResNet-38, InPlace-ABN (batch 256)",
                "ResNeXt-101, InPlace-ABN sync (batch 256)"), _IMAGENET_3),
    PaperTable("inplace_abn_t3", "InPlace-ABN Table 3: single-scale validation mIoU [%] (crops per batch × crop side)",
               ("std-BN + Leaky ReLU", "InPlace-ABN, fixed crop", "InPlace-ABN, fixed batch",
                "InPlace-ABN sync, fixed batch"),
               tuple(Column(c, _MIOU) for c in ("ResNeXt-101 Cityscapes", "ResNeXt-101 COCO-Stuff",
                                                "WideResNet-38 Cityscapes", "WideResNet-38 COCO-Stuff"))),
    PaperTable("inplace_abn_t4", "InPlace-ABN Table 4: Cityscapes / Mapillary Vistas validation mIoU [%] "
               "(single scale, no flip)",
               ("ResNeXt-152, InPlace-ABN sync, 12×680²", "WideResNet-38, InPlace-ABN, 16×712²",
                "WideResNet-38, InPlace-ABN sync, 16×712²", "WideResNet-38, InPlace-ABN sync, 12×872²",
                "WideResNet-38, InPlace-ABN sync, 12×872², class-uniform",
                "WideResNet-38, InPlace-ABN sync, 12×776², class-uniform"),
               (Column("Cityscapes mIoU", _MIOU), Column("Vistas mIoU", _MIOU))),
    PaperTable("mabn_t1", "MABN Table 1: ResNet-50 on ImageNet, top-1 error [%] (gradient batch 32 per GPU; "
               "normalization batch in brackets)",
               ("BN (32)", "BN (2)", "BRN (2)", "MABN (2)"),
               (Column("top-1 error", "100-protocols.center.top1"),),
               note="Paper numbers from the authors' README (accuracy 76.59 / 64.78 / 69.71 / 76.33)."),
    PaperTable("mabn_t3", "MABN Table 3: Mask R-CNN R50-FPN on COCO, 2 images per GPU × 8, box AP / mask AP [%]",
               ("BN, from scratch", "BRN, from scratch", "SyncBN, from scratch", "MABN, from scratch",
                "SyncBN, fine-tune", "MABN, fine-tune"),
               (Column("AP bbox", "protocols.bbox.AP"), Column("AP mask", "protocols.segm.AP"))),
    PaperTable("cbn_t3", "CBN Table 3: ResNet-18 top-1 [%] on ImageNet vs batch size per GPU",
               ("BN", "GN", "BRN", "CBN"),
               tuple(Column(f"bs {b}", "protocols.center.top1") for b in (32, 16, 8, 4, 2, 1))),
    PaperTable("cbn_t4", "CBN Table 4: top-1 [%] on ImageNet across architectures (only those abnexp has)",
               ("ResNet-50",),
               tuple(Column(c, "protocols.center.top1") for c in ("BN bs=32", "BN bs=4", "GN", "BRN", "CBN")),
               note="VGG-16, Inception-v3, DenseNet-121 and MobileNet-v2 rows are not reproduced: abnexp has no "
                    "such backbones."),
    PaperTable("cbn_t5", "CBN Table 5: Faster R-CNN R50-FPN on COCO, box AP [%] (backbone / box head norm)",
               ("fixed BN / BN", "fixed BN / syncBN", "fixed BN / GN", "fixed BN / BRN", "fixed BN / CBN",
                "BN / BN", "syncBN / syncBN", "GN / GN", "CBN / CBN"),
               tuple(Column(f"{m} bbox", f"protocols.bbox.{m}") for m in _BOX)),
    PaperTable("cbn_t6", "CBN Table 6: stronger backbones on COCO, box AP and mask AP [%]",
               tuple(f"{b} {h} {n}" for b in ("R50+FPN", "R101+FPN") for h in ("Faster R-CNN", "Mask R-CNN")
                     for n in ("GN", "syncBN", "CBN")),
               tuple(Column(f"{m} bbox", f"protocols.bbox.{m}") for m in _BOX)
               + tuple(Column(f"{m} mask", f"protocols.segm.{m}") for m in _BOX[:3]),
               note="As printed, Faster R-CNN rows report AP/AP50/AP75/APs/APm/APl for boxes and Mask R-CNN rows "
                    "AP/AP50/AP75 for boxes and masks."),
)}
