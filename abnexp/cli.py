"""The ``abnexp`` command: ``abnexp <command> [key=value ...]`` (also ``python -m abnexp``).

Commands are one explicit table, :data:`COMMANDS`: each entry carries the function that runs it
(in its module of abnexp.commands) and its user-facing help -- what it does, its usage, an
example and the README section -- printed by ``abnexp``, ``abnexp --help`` and
``abnexp <command> --help``. ``abnexp train --help`` is Hydra's help, whose template is
configs/hydra/help/abnexp.yaml.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from abnexp.commands import data, eval, export, import_weights, kernels, memory, recipes, table, train
from abnexp.errors import AbnexpError, exit_with

HELP_FLAGS = ("-h", "--help")


@dataclass(frozen=True)
class Command:
    """One command: ``run(argv)`` with the arguments after its name, and its help for users."""

    run: Callable[[list[str]], object]
    summary: str  # what it does, one line
    usage: str
    example: str
    readme: str  # the README.md section that documents it


COMMANDS: dict[str, Command] = {
    "train": Command(train.train_command, "train a model on the configuration you compose (group=option key=value)",
                     "abnexp train [group=option ...] [key=value ...]   (-m: a sweep; --help: the groups)",
                     "abnexp train model=resnext101 norm=inplace_abn data=imagenet data.root=/data/imagenet",
                     "Main commands"),
    "eval": Command(eval.eval_command, "evaluate a trained checkpoint (top-1/top-5, mIoU or COCO AP) into eval.json",
                    "abnexp eval checkpoint=CHECKPOINT [key=value ...]",
                    "abnexp eval checkpoint=runs/demo/resnet18-bn/<date>/checkpoints/last.pt", "Main commands"),
    "export": Command(export.export_command, "export a checkpoint for deployment (ONNX, torch.export, state dict)",
                      "abnexp export checkpoint=CHECKPOINT format=onnx|pt2|state_dict [fold=true] [out=FILE]",
                      "abnexp export checkpoint=runs/.../checkpoints/last.pt format=onnx", "Export for deployment"),
    "import": Command(import_weights.import_command, "turn weights from elsewhere (InPlace-ABN's releases, "
                      "torchvision, timm) into an abnexp checkpoint",
                      "abnexp import FILE out=FILE [model=NAME] [norm=NAME] [key=value ...]",
                      "abnexp import resnext101_ipabn_lr_512.pth.tar out=weights/rx101.pt", "Pretrained weights"),
    "list": Command(recipes.list_command, "list the paper recipes (experiment=NAME) and the table row each reproduces",
                    "abnexp list", "abnexp list", "Paper recipes, tables and the memory planner"),
    "table": Command(table.table_command, "compare runs: the papers' tables with our numbers beside theirs, "
                     "and loss curves", "abnexp table RUN_OR_SWEEP_DIR ... [out=DIR] | abnexp table memory",
                     "abnexp table runs/multirun/2025-01-01_12-00-00", "Paper recipes, tables and the memory planner"),
    "memory": Command(memory.memory_command, "the memory a training step needs, and the largest batch or crop "
                      "that fits a GPU", "abnexp memory [group=option ...] [memory.device=NAME] [key=value ...]",
                      "abnexp memory model=resnext101 norm=inplace_abn data=imagenet",
                      "Paper recipes, tables and the memory planner"),
    "data": Command(data.data_command, "check a dataset before training on it, or prepare ImageNet from its archives",
                    "abnexp data check data=NAME data.root=DIR [max_images=N] | "
                    "abnexp data prepare imagenet src=ARCHIVES_DIR root=DIR",
                    "abnexp data check data=cityscapes data.root=/data/cityscapes", "Semantic segmentation"),
    "kernels": Command(kernels.kernels_command, "build the fast normalization kernels for this machine and "
                       "check them against the reference", "abnexp kernels build | abnexp kernels check",
                       "abnexp kernels check", "Native kernels"),
}
"""command name -> :class:`Command`."""


def usage() -> str:
    """``abnexp`` / ``abnexp --help``: every command with what it does and an example."""
    width = max(map(len, COMMANDS))
    lines = ["usage: abnexp <command> [arguments]      (abnexp <command> --help: more on one command)", "",
             "Reproduces the batch-normalization papers (InPlace-ABN, MABN, CBN): train, evaluate, compare,",
             "export. `abnexp train` alone trains ResNet-18 on generated demo data in a few CPU minutes.", "",
             "commands:"]
    for name, c in COMMANDS.items():
        lines += [f"  {name:{width}s}  {c.summary}", f"  {'':{width}s}    e.g. {c.example}"]
    lines += ["", "Documentation: README.md (each command's section is named by `abnexp <command> --help`)."]
    return "\n".join(lines)


def command_help(name: str) -> str:
    """``abnexp <command> --help`` for the commands whose help is not Hydra's."""
    c = COMMANDS[name]
    return "\n".join([f"abnexp {name}: {c.summary}", "", f"usage: {c.usage}", f"example: {c.example}", "",
                      f"Documentation: README.md, section \"{c.readme}\"."])


def main(argv: list[str] | None = None) -> None:
    """Runs one command; an :class:`~abnexp.errors.AbnexpError` exits with status 1 and its one
    line on stderr (no traceback). No command or an unknown one prints :func:`usage` (status 2;
    0 for ``--help``); ``--help`` after a command other than train prints :func:`command_help`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in HELP_FLAGS
        print(usage(), file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    if argv[0] != "train" and set(HELP_FLAGS) & set(argv[1:]):
        print(command_help(argv[0]))
        sys.exit(0)
    try:
        COMMANDS[argv[0]].run(argv[1:])
    except AbnexpError as e:
        exit_with(e)
