"""The ``abnexp`` command: ``abnexp <command> [key=value ...]`` (also ``python -m abnexp``).

Commands (one explicit table, COMMANDS; each is a module of abnexp.commands):
  train   train a model; Hydra overrides (model=resnext101 norm=inplace_abn data.root=...),
          -m/--multirun sweeps, --cfg job prints the composed config
  eval    evaluate a checkpoint: abnexp eval checkpoint=<run dir>/checkpoints/last.pt [overrides]
  export  for deployment: abnexp export checkpoint=PATH format=onnx|pt2|state_dict [fold=true] [out=PATH]
  list    list the paper recipes (experiment=<table>/<cell>) with the table and row each reproduces
  table   write the papers' tables from runs: abnexp table RUN_DIR... [out=results/tables];
          abnexp table memory: InPlace-ABN Table 3's crop counts by the memory planner
  memory  a step's simulated peak, what fits memory.device: abnexp memory model=resnext101 [memory.json=PATH]
  data    check a dataset before training: abnexp data check data=cityscapes data.root=PATH
  kernels kernel backends: abnexp kernels build [--backend native|triton] [--arch ...] | abnexp kernels check [--backend] [--device]
  import  weights from elsewhere (reference InPlace-ABN *.pth.tar, torchvision / timm state dicts) as an
          abnexp checkpoint: abnexp import PATH out=FILE [model=NAME] [norm=NAME] [key=value ...]
"""
from __future__ import annotations

import sys

from abnexp.commands import data, eval, export, import_weights, kernels, memory, recipes, table, train
from abnexp.errors import AbnexpError, exit_with

COMMANDS = {"train": train.train_command, "eval": eval.eval_command, "export": export.export_command,
            "list": recipes.list_command,
            "table": table.table_command, "memory": memory.memory_command, "data": data.data_command,
            "kernels": kernels.kernels_command, "import": import_weights.import_command}
"""command -> function taking the remaining arguments."""


def main(argv: list[str] | None = None) -> None:
    """Runs one command; an :class:`~abnexp.errors.AbnexpError` exits with status 1 and its one
    line on stderr (no traceback); no or an unknown command prints this usage (status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    try:
        COMMANDS[argv[0]](argv[1:])
    except AbnexpError as e:
        exit_with(e)
