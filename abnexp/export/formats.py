"""The export formats (:data:`FORMATS`, one entry per ``format=`` of ``abnexp export``) and what
a task's model takes and returns (:data:`TASK_IO`, one entry per task).

Every format takes the inference model (:func:`abnexp.export.fold.inference_model`) and an example
input; batch (where the task allows it) and image size stay dynamic in the written file.

=============  ==========================================================================================
``onnx``       ONNX, opset :data:`OPSET`, TorchScript exporter (``torch.onnx.export(dynamo=False)``), names
               and dynamic axes of :data:`TASK_IO`; runs in onnxruntime. Needs the ``onnx`` package.
``pt2``        ``torch.export`` program (``torch.export.save``; ``torch.export.load(path).module()`` runs it);
               classification and segmentation (a detector's data-dependent control flow does not export)
``state_dict`` the inference model's ``state_dict()`` (``torch.save``; loads into
               ``inference_model(model, fold)`` of the same architecture); every task
=============  ==========================================================================================
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

OPSET = 17


# --- what a task's model takes and returns -------------------------------------------------------
@dataclass(frozen=True)
class TaskIO:
    """The input and outputs of one task's model, as the exported files name them.

    Attributes:
        example: ``(batch, height, width) -> args`` of the model's forward (random images).
        outputs: ``model(*args) -> [(name, tensor), ...]``, the outputs flattened in file order.
        input_name: the ONNX input; ``input_axes``: its dynamic axes (index -> name).
        output_axes: ``(name, tensor) -> dynamic axes`` of an ONNX output.
        image: ``args -> the image tensor`` fed to the ONNX input.
        fixed_batch: the model takes exactly this batch (None: any).
        difference: ``(got, expected) -> float``, how far an exported file's outputs are from
            PyTorch's (the file passes at <= 1e-4); inf when their count or shapes differ.
        pt2: ``torch.export`` can export the model.
    """

    example: Callable[[int, int, int], tuple]
    outputs: Callable[[object], list[tuple[str, Tensor]]]
    input_name: str
    input_axes: dict[int, str]
    output_axes: Callable[[str, Tensor], dict[int, str]]
    image: Callable[[tuple], Tensor]
    difference: Callable[[list[Tensor], list[Tensor]], float]
    fixed_batch: Optional[int] = None
    pt2: bool = True


def _image_batch(n: int, h: int, w: int) -> tuple:
    return (torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(n * h + w)),)


def _image_list(n: int, h: int, w: int) -> tuple:
    return ([torch.rand(3, h, w, generator=torch.Generator().manual_seed(h + w))],)


def _same_shapes(got: list[Tensor], expected: list[Tensor]) -> bool:
    return len(got) == len(expected) and all(g.shape == e.shape for g, e in zip(got, expected))


def max_difference(got: list[Tensor], expected: list[Tensor]) -> float:
    """max |got - expected| over every output (logits); inf when the count or shapes differ."""
    if not _same_shapes(got, expected):
        return float("inf")
    return max((float((g.double() - e.double()).abs().max()) for g, e in zip(got, expected) if e.numel()),
               default=0.0)


def detection_difference(got: list[Tensor], expected: list[Tensor]) -> float:
    """The worst of: box coordinates' max |Δ| / max(1, largest |coordinate|) (pixels), scores' max
    |Δ|, 1 if any label differs; inf when the count or shapes differ. Outputs in torchvision's order
    (boxes, labels, scores[, masks]). Masks are not compared: torchvision pastes them into the image
    with another loop when traced for ONNX, and pixels on a box's border differ."""
    if not _same_shapes(got, expected):
        return float("inf")
    if not expected[0].numel():
        return 0.0
    boxes, labels, scores = (g.double() - e.double() for g, e in zip(got[:3], expected[:3]))
    return max(float(boxes.abs().max()) / max(1.0, float(expected[0].abs().max())), float(scores.abs().max()),
               float(labels.abs().max() > 0))


_IMAGES = TaskIO(
    example=_image_batch, outputs=lambda out: [("logits", out)], input_name="input",
    input_axes={0: "batch", 2: "height", 3: "width"},
    output_axes=lambda name, t: {0: "batch", 2: "height", 3: "width"} if t.dim() == 4 else {0: "batch"},
    image=lambda args: args[0], difference=max_difference)
TASK_IO: dict[str, TaskIO] = {
    "cls": _IMAGES,  # (N, 3, H, W) -> logits (N, K)
    "semseg": _IMAGES,  # (N, 3, H, W) -> logits (N, K, H, W)
    # torchvision's detectors in eval: [(3, H, W)] -> [{boxes (D, 4) in pixels, labels (D,), scores (D,),
    # masks (D, 1, H, W)}]; torchvision's ONNX support is one image per call, any size
    "detection": TaskIO(
        example=_image_list, outputs=lambda out: list(out[0].items()), input_name="image",
        input_axes={1: "height", 2: "width"},
        output_axes=lambda name, t: {0: "detections", 2: "height", 3: "width"} if t.dim() == 4 else {0: "detections"},
        image=lambda args: args[0][0], fixed_batch=1, difference=detection_difference, pt2=False),
}
"""task name -> what its model takes and returns."""


# --- the formats ----------------------------------------------------------------------------------
def write_onnx(model: nn.Module, io: TaskIO, example: tuple, path: Path) -> None:
    """ONNX opset :data:`OPSET`, input / outputs named and dynamic as ``io`` says."""
    with torch.no_grad():
        outputs = io.outputs(model(*example))
    names = [name for name, _ in outputs]
    axes = {io.input_name: io.input_axes, **{name: io.output_axes(name, t) for name, t in outputs}}
    torch.onnx.export(model, example, str(path), dynamo=False, opset_version=OPSET,
                      input_names=[io.input_name], output_names=names, dynamic_axes=axes)


def run_onnx(path: Path, io: TaskIO, args: tuple) -> list[Tensor]:
    """The ONNX model at ``path`` run by onnxruntime (CPU) on the image of ``args``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, {io.input_name: io.image(args).numpy()})]


def write_pt2(model: nn.Module, io: TaskIO, example: tuple, path: Path) -> None:
    """``torch.export`` with the input's dynamic axes as ``Dim.AUTO`` (sizes the model constrains
    are kept as torch.export infers them)."""
    shapes = ({axis: torch.export.Dim.AUTO for axis in io.input_axes},)
    torch.export.save(torch.export.export(model, example, dynamic_shapes=shapes), str(path))


def run_pt2(path: Path, io: TaskIO, args: tuple) -> list[Tensor]:
    """The saved ``torch.export`` program at ``path`` run on ``args``."""
    with torch.no_grad():
        return [t for _, t in io.outputs(torch.export.load(str(path)).module()(*args))]


def write_state_dict(model: nn.Module, io: TaskIO, example: tuple, path: Path) -> None:
    """``torch.save(model.state_dict())``."""
    torch.save(model.state_dict(), path)


@dataclass(frozen=True)
class ExportFormat:
    """One ``format=``: file suffix, writer ``(model, io, example, path)``, the runner
    ``(path, io, args) -> outputs`` that checks the file against PyTorch (None: nothing to run),
    whether it needs :attr:`TaskIO.pt2`, and the packages it imports."""

    suffix: str
    write: Callable[[nn.Module, TaskIO, tuple, Path], None]
    run: Optional[Callable[[Path, TaskIO, tuple], list[Tensor]]]
    needs_export: bool = False
    packages: tuple[str, ...] = ()


FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat(".onnx", write_onnx, run_onnx, packages=("onnx", "onnxruntime")),
    "pt2": ExportFormat(".pt2", write_pt2, run_pt2, needs_export=True),
    "state_dict": ExportFormat(".state_dict.pt", write_state_dict, None),
}
"""format name -> its entry."""
