"""``abnexp export checkpoint=PATH format=onnx|pt2|state_dict [fold=true] [out=PATH] [overrides]``:
rebuild the model from the checkpoint's config (as ``abnexp eval``), put every normalization in its
inference form (folded into the preceding convolution with ``fold=true``), write it in ``format``
and check the written file against the PyTorch model on an input of another batch and image size.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from abnexp.commands.eval import config_from_checkpoint
from abnexp.engine.checkpoint import load_checkpoint
from abnexp.errors import AbnexpError, ConfigError
from abnexp.export.fold import inference_model
from abnexp.export.formats import FORMATS, TASK_IO
from abnexp.tasks import build_task

USAGE = ("usage: abnexp export checkpoint=<run dir>/checkpoints/last.pt format=onnx|pt2|state_dict "
         "[fold=true|false] [out=PATH] [key=value ...]")
KEYS = ("checkpoint", "format", "fold", "out")
BOOLEANS = {"true": True, "false": False}
EXAMPLE_SIZE = (128, 128)
CHECK_SIZE = (160, 96)
"""The file is traced at batch 2 (where the task allows), 128 x 128 and checked at batch 1, 160 x 96."""
TOLERANCE = 1e-4


class ExportMismatch(AbnexpError):
    """The written file computes something else than the PyTorch model."""


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """(``{checkpoint, format, fold, out}``, the config overrides).

    Raises:
        ConfigError: no / repeated ``checkpoint=`` or ``format=``, an unknown format, a fold
            that is not true/false (each naming the valid values).
    """
    args, overrides = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key not in KEYS:
            overrides.append(arg)
        elif key in args or not sep:
            raise ConfigError(f"{key}= given twice or without a value; {USAGE}")
        else:
            args[key] = value
    if "checkpoint" not in args or "format" not in args:
        raise ConfigError(USAGE)
    if args["format"] not in FORMATS:
        raise ConfigError(f"format={args['format']!r} is not an export format; valid: {', '.join(FORMATS)}")
    fold = args.get("fold", "true").lower()
    if fold not in BOOLEANS:
        raise ConfigError(f"fold={args['fold']!r} must be true or false")
    args["fold"] = BOOLEANS[fold]
    return args, overrides


def default_out(checkpoint: Path, suffix: str, fold: bool) -> Path:
    """``<checkpoint stem>[_unfolded]<suffix>`` beside the checkpoint."""
    return checkpoint.with_name(checkpoint.stem + ("" if fold else "_unfolded") + suffix)


def run_export(argv: list[str]) -> dict:
    """Exports a checkpoint; returns {"path", "format", "fold", "difference"}: the task's
    :attr:`~abnexp.export.formats.TaskIO.difference` between the file and PyTorch (max |Δ| of the
    logits; None for state_dict, which has nothing to run).

    Raises:
        ConfigError: bad arguments or overrides, an unreadable checkpoint, a task or model the
            format cannot take, a missing package the format needs.
        ExportMismatch: the written file's outputs differ from PyTorch's by more than 1e-4.
    """
    args, overrides = parse_args(argv)
    fmt = FORMATS[args["format"]]
    missing = [p for p in fmt.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"format={args['format']} needs {', '.join(missing)}: pip install {' '.join(missing)}")
    path = Path(args["checkpoint"]).expanduser()
    state = load_checkpoint(path)
    cfg = config_from_checkpoint(state["config"], overrides)
    io = TASK_IO.get(cfg.task.name)
    if io is None or (fmt.needs_export and not io.pt2):
        able = [name for name, t in TASK_IO.items() if t.pt2 or not fmt.needs_export]
        raise ConfigError(f"format={args['format']} exports task={'/'.join(able)} models, not task={cfg.task.name} "
                          f"(torchvision's detectors have data-dependent control flow that torch.export does "
                          f"not capture); use format=onnx or format=state_dict")
    model = build_task(cfg).build_model()
    model.load_state_dict(state["model"])
    try:
        inference = inference_model(model, fold=args["fold"])
    except ValueError as e:
        raise ConfigError(f"cannot export {path}: {e}") from None
    out = Path(args["out"]).expanduser() if "out" in args else default_out(path, fmt.suffix, args["fold"])
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt.write(inference, io, io.example(io.fixed_batch or 2, *EXAMPLE_SIZE), out)
    diff = None
    if fmt.run is not None:
        check = (io.fixed_batch or 1, *CHECK_SIZE)
        with torch.no_grad():
            expected = [t for _, t in io.outputs(model.eval()(*io.example(*check)))]
        diff = io.difference(fmt.run(out, io, io.example(*check)), expected)
        if not diff <= TOLERANCE:
            raise ExportMismatch(f"{out}: Δ = {diff:.3g} against the PyTorch model at {check[0]}x3x{check[1]}x{check[2]} "
                                 f"(tolerance {TOLERANCE}); please report this model / norm")
    print(f"wrote {out} ({args['format']}, fold={str(args['fold']).lower()}"
          + ("" if diff is None else f", Δ = {diff:.2g} vs PyTorch at {check[0]}x3x{check[1]}x{check[2]}") + ")")
    return {"path": str(out), "format": args["format"], "fold": args["fold"], "difference": diff}


def export_command(argv: list[str]) -> None:
    """``abnexp export checkpoint=PATH format=... [fold=...] [out=...] [overrides]``."""
    run_export(argv)
