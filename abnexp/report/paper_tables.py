"""The papers' tables: title, rows and columns as printed, the papers' numbers, and where each
cell's number is found in a run's ``eval.json``; and InPlace-ABN Table 3's memory figures.

A recipe (configs/experiment/<table>/<cell>.yaml) names its table (``experiment.table``, a key of
:data:`TABLES`), its row and — for tables whose cells come from different runs (InPlace-ABN
Table 3) — its column. The papers: Rota Bulò et al., "In-Place Activated BatchNorm for
Memory-Optimized Training of DNNs" (CVPR 2018, and its supplementary material); Yan et al.,
"Towards Stabilizing Batch Statistics in Backward Propagation of Batch Normalization" (MABN,
ICLR 2020); Yao et al., "Cross-Iteration Batch Normalization" (CBN, CVPR 2021).
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
    reported: dict[str, tuple[float | None, ...]] = field(default_factory=dict)
    """row -> the paper's numbers in column order (None: a cell the paper does not print)."""
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
               ("ReLU / ReLU", "ReLU / Leaky ReLU", "Leaky ReLU / Leaky ReLU", "Leaky ReLU / ReLU"), _IMAGENET_3,
               reported={
                   "ReLU / ReLU": (77.74, 93.86, 79.21, 94.67, 79.17, 94.67),
                   "ReLU / Leaky ReLU": (76.88, 93.42, 78.74, 94.46, 78.37, 94.25),
                   "Leaky ReLU / Leaky ReLU": (77.04, 93.5, 78.72, 94.47, 77.92, 94.28),
                   "Leaky ReLU / ReLU": (76.81, 93.53, 78.46, 94.38, 77.84, 94.2)}),
    PaperTable("inplace_abn_t2", "InPlace-ABN Table 2: ImageNet validation, top-1/top-5 [%]",
               ("ResNeXt-101, std-BN (batch 256)", "ResNeXt-101, InPlace-ABN (batch 512)",
                "ResNeXt-152, InPlace-ABN (batch 256)", "WideResNet-38, InPlace-ABN (batch 256)",
                "ResNeXt-101, InPlace-ABN sync (batch 256)"), _IMAGENET_3,
               reported={
                   "ResNeXt-101, std-BN (batch 256)": (77.04, 93.5, 78.72, 94.47, 77.92, 94.28),
                   "ResNeXt-101, InPlace-ABN (batch 512)": (78.08, 93.79, 79.52, 94.66, 79.38, 94.67),
                   "ResNeXt-152, InPlace-ABN (batch 256)": (78.28, 94.04, 79.73, 94.82, 79.56, 94.67),
                   "WideResNet-38, InPlace-ABN (batch 256)": (79.72, 94.78, 81.03, 95.43, 80.69, 95.27),
                   "ResNeXt-101, InPlace-ABN sync (batch 256)": (77.7, 93.78, 79.18, 94.6, 78.98, 94.56)}),
    PaperTable("inplace_abn_t3", "InPlace-ABN Table 3: single-scale validation mIoU [%] (crops per batch × crop side)",
               ("std-BN + Leaky ReLU", "InPlace-ABN, fixed crop", "InPlace-ABN, fixed batch",
                "InPlace-ABN sync, fixed batch"),
               tuple(Column(c, _MIOU) for c in ("ResNeXt-101 Cityscapes", "ResNeXt-101 COCO-Stuff",
                                                "WideResNet-38 Cityscapes", "WideResNet-38 COCO-Stuff")),
               reported={
                   "std-BN + Leaky ReLU": (74.42, 20.3, 75.82, 22.44),
                   "InPlace-ABN, fixed crop": (75.8, 22.63, 77.75, 22.96),
                   "InPlace-ABN, fixed batch": (77.04, 23.35, 78.31, 24.1),
                   "InPlace-ABN sync, fixed batch": (77.58, 24.91, 78.06, 25.11)}),
    PaperTable("inplace_abn_t4", "InPlace-ABN Table 4: Cityscapes / Mapillary Vistas validation mIoU [%] "
               "(single scale, no flip)",
               ("ResNeXt-152, InPlace-ABN sync, 12×680²", "WideResNet-38, InPlace-ABN, 16×712²",
                "WideResNet-38, InPlace-ABN sync, 16×712²", "WideResNet-38, InPlace-ABN sync, 12×872²",
                "WideResNet-38, InPlace-ABN sync, 12×872², class-uniform",
                "WideResNet-38, InPlace-ABN sync, 12×776², class-uniform"),
               (Column("Cityscapes mIoU", _MIOU), Column("Vistas mIoU", _MIOU)),
               reported={
                   "ResNeXt-152, InPlace-ABN sync, 12×680²": (78.49, None),
                   "WideResNet-38, InPlace-ABN, 16×712²": (78.45, None),
                   "WideResNet-38, InPlace-ABN sync, 16×712²": (79.02, None),
                   "WideResNet-38, InPlace-ABN sync, 12×872²": (79.16, None),
                   "WideResNet-38, InPlace-ABN sync, 12×872², class-uniform": (79.4, None),
                   "WideResNet-38, InPlace-ABN sync, 12×776², class-uniform": (None, 53.12)}),
    PaperTable("mabn_t1", "MABN Table 1: ResNet-50 on ImageNet, top-1 error [%] (gradient batch 32 per GPU; "
               "normalization batch in brackets)",
               ("BN (32)", "BN (2)", "BRN (2)", "MABN (2)"),
               (Column("top-1 error", "100-protocols.center.top1"),),
               reported={"BN (32)": (23.41,), "BN (2)": (35.22,), "BRN (2)": (30.29,), "MABN (2)": (23.67,)},
               note="Paper numbers from the authors' README (accuracy 76.59 / 64.78 / 69.71 / 76.33)."),
    PaperTable("mabn_t3", "MABN Table 3: Mask R-CNN R50-FPN on COCO, 2 images per GPU × 8, box AP / mask AP [%]",
               ("BN, from scratch", "BRN, from scratch", "SyncBN, from scratch", "MABN, from scratch",
                "SyncBN, fine-tune", "MABN, fine-tune"),
               (Column("AP bbox", "protocols.bbox.AP"), Column("AP mask", "protocols.segm.AP")),
               reported={
                   "BN, from scratch": (32.38, 29.07),
                   "BRN, from scratch": (34.07, 30.98),
                   "SyncBN, from scratch": (36.8, 33.1),
                   "MABN, from scratch": (36.5, 32.69),
                   "SyncBN, fine-tune": (38.25, 34.22),
                   "MABN, fine-tune": (38.42, 34.12)}),
    PaperTable("cbn_t3", "CBN Table 3: ResNet-18 top-1 [%] on ImageNet vs batch size per GPU",
               ("BN", "GN", "BRN", "CBN"),
               tuple(Column(f"bs {b}", "protocols.center.top1") for b in (32, 16, 8, 4, 2, 1)),
               reported={
                   "BN": (70.2, 70.2, 68.4, 65.1, 55.9, None),
                   "GN": (68.9, 69.0, 68.9, 69.0, 69.1, 68.9),
                   "BRN": (70.1, 69.5, 68.2, 67.9, 60.3, None),
                   "CBN": (70.2, 70.2, 70.1, 70.0, 69.6, 69.3)}),
    PaperTable("cbn_t4", "CBN Table 4: top-1 [%] on ImageNet across architectures (only those abnexp has)",
               ("ResNet-50",),
               tuple(Column(c, "protocols.center.top1") for c in ("BN bs=32", "BN bs=4", "GN", "BRN", "CBN")),
               reported={"ResNet-50": (76.1, 72.2, 75.5, 73.8, 76.0)},
               note="VGG-16, Inception-v3, DenseNet-121 and MobileNet-v2 rows are not reproduced: abnexp has no "
                    "such backbones."),
    PaperTable("cbn_t5", "CBN Table 5: Faster R-CNN R50-FPN on COCO, box AP [%] (backbone / box head norm)",
               ("fixed BN / BN", "fixed BN / syncBN", "fixed BN / GN", "fixed BN / BRN", "fixed BN / CBN",
                "BN / BN", "syncBN / syncBN", "GN / GN", "CBN / CBN"),
               tuple(Column(f"{m} bbox", f"protocols.bbox.{m}") for m in _BOX),
               reported={
                   "fixed BN / BN": (36.3, 57.3, 39.2, 20.8, 39.7, 47.3),
                   "fixed BN / syncBN": (37.7, 58.5, 41.1, 22.0, 40.9, 49.0),
                   "fixed BN / GN": (37.8, 59.0, 40.8, 22.3, 41.2, 48.4),
                   "fixed BN / BRN": (37.4, 58.1, 40.3, 22.0, 40.7, 48.3),
                   "fixed BN / CBN": (37.7, 59.0, 40.7, 22.1, 40.9, 48.8),
                   "BN / BN": (35.5, 56.4, 38.7, 19.7, 38.8, 47.3),
                   "syncBN / syncBN": (37.9, 58.5, 41.1, 21.7, 41.5, 49.7),
                   "GN / GN": (37.8, 59.1, 40.9, 22.4, 41.2, 49.0),
                   "CBN / CBN": (37.7, 58.9, 40.6, 22.0, 41.4, 48.9)},
               note="The paper's 'fixed BN / -' row (no head norm, 36.9 AP) has no recipe: abnexp heads always "
                    "carry the configured norm."),
    PaperTable("cbn_t6", "CBN Table 6: stronger backbones on COCO, box AP and mask AP [%]",
               tuple(f"{b} {h} {n}" for b in ("R50+FPN", "R101+FPN") for h in ("Faster R-CNN", "Mask R-CNN")
                     for n in ("GN", "syncBN", "CBN")),
               tuple(Column(f"{m} bbox", f"protocols.bbox.{m}") for m in _BOX)
               + tuple(Column(f"{m} mask", f"protocols.segm.{m}") for m in _BOX[:3]),
               # columns: AP AP50 AP75 APs APm APl (bbox), AP AP50 AP75 (mask)
               reported={
                   "R50+FPN Faster R-CNN GN": (37.8, 59.0, 40.8, 22.3, 41.2, 48.4, None, None, None),
                   "R50+FPN Faster R-CNN syncBN": (37.7, 58.5, 41.1, 22.0, 40.9, 49.0, None, None, None),
                   "R50+FPN Faster R-CNN CBN": (37.7, 59.0, 40.7, 22.1, 40.9, 48.8, None, None, None),
                   "R50+FPN Mask R-CNN GN": (38.6, 59.8, 41.9, None, None, None, 35.0, 56.7, 37.3),
                   "R50+FPN Mask R-CNN syncBN": (38.5, 58.9, 42.3, None, None, None, 34.7, 56.3, 36.8),
                   "R50+FPN Mask R-CNN CBN": (38.5, 59.2, 42.1, None, None, None, 34.6, 56.4, 36.6),
                   "R101+FPN Faster R-CNN GN": (39.3, 60.6, 42.7, 22.5, 42.5, 51.3, None, None, None),
                   "R101+FPN Faster R-CNN syncBN": (39.2, 59.8, 43.0, 22.2, 42.9, 51.6, None, None, None),
                   "R101+FPN Faster R-CNN CBN": (39.2, 60.0, 42.6, 22.3, 42.6, 51.1, None, None, None),
                   "R101+FPN Mask R-CNN GN": (40.3, 61.2, 44.2, None, None, None, 36.6, 58.5, 39.2),
                   "R101+FPN Mask R-CNN syncBN": (40.3, 60.8, 44.2, None, None, None, 36.0, 57.7, 38.6),
                   "R101+FPN Mask R-CNN CBN": (40.1, 60.5, 44.1, None, None, None, 35.8, 57.3, 38.5)},
               note="As printed, Faster R-CNN rows report AP/AP50/AP75/APs/APm/APl for boxes and Mask R-CNN rows "
                    "AP/AP50/AP75 for boxes and masks."),
)}


def paper_values() -> dict[tuple[str, str, str], float]:
    """{(table key, row, column label): the paper's number} for every printed cell of :data:`TABLES`."""
    return {(t.key, row, col.label): value for t in TABLES.values() for row, values in t.reported.items()
            for col, value in zip(t.columns, values) if value is not None}


@dataclass(frozen=True)
class MemoryColumn:
    """One column of InPlace-ABN Table 3 as memory figures per GPU (the paper prints the batch's
    totals over 4 GPUs): the crops of ``crop``² that fit one 12 GB GPU with std-BN and with
    InPlace-ABN (the "fixed crop" row), and InPlace-ABN's crop side at std-BN's crop count (the
    "fixed batch" row)."""

    network: str  # as printed
    dataset: str  # as printed
    model: str  # abnexp's model option
    std_crops: int
    inplace_crops: int
    crop: int
    fixed_batch_crop: int

    @property
    def column(self) -> str:
        """The column label in ``TABLES["inplace_abn_t3"]``."""
        return f"{self.network} {self.dataset}"

    def ratio_bounds(self) -> tuple[float, float]:
        """The open interval of the true ratio (crops InPlace-ABN fits / crops std-BN fits) that the
        paper's whole-crop counts allow: std-BN fitting b crops but not b + 1 and InPlace-ABN i but
        not i + 1 puts it in (i / (b + 1), (i + 1) / b)."""
        b, i = self.std_crops, self.inplace_crops
        return i / (b + 1), (i + 1) / b


TABLE3_MEMORY: tuple[MemoryColumn, ...] = (
    MemoryColumn("ResNeXt-101", "Cityscapes", "resnext101", 4, 7, 512, 672),
    MemoryColumn("ResNeXt-101", "COCO-Stuff", "resnext101", 4, 6, 480, 600),
    MemoryColumn("WideResNet-38", "Cityscapes", "wideresnet38", 5, 7, 512, 640),
    MemoryColumn("WideResNet-38", "COCO-Stuff", "wideresnet38", 5, 7, 496, 576),
)
