"""The ``abnexp`` command: ``abnexp <command> [key=value ...]`` (also ``python -m abnexp``).

Commands (one explicit table, COMMANDS):
  train   train a model; Hydra overrides (model=resnext101 norm=inplace_abn data.root=...),
          -m/--multirun sweeps, --cfg job prints the composed config
  eval    evaluate a checkpoint: abnexp eval checkpoint=<run dir>/checkpoints/last.pt [overrides]
  list    list the paper recipes (experiment=<name>) with the table and row each reproduces
  table   write the papers' tables from runs: abnexp table RUN_DIR... [out=results/tables];
          abnexp table memory: InPlace-ABN Table 3's crop counts by the memory planner
  memory  what fits in memory.device_gb: abnexp memory model=resnext101 norm=inplace_abn [memory.json=PATH]
  data    check a dataset before training: abnexp data check data=cityscapes data.root=PATH
  kernels native kernels: abnexp kernels build [--cuda] [--verbose] | abnexp kernels check [--device]
"""
from __future__ import annotations

import logging
import sys

from abnexp.errors import AbnexpError

log = logging.getLogger("abnexp")


def _fail(error: AbnexpError) -> None:
    message = str(error)
    if "Original Traceback" in message:  # raised in a DataLoader worker: keep the final line
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    print(f"abnexp: error: {message}", file=sys.stderr)
    sys.exit(1)


def run_training(cfg, run_dir) -> dict:
    """Trains ``cfg`` in ``run_dir`` in this process; an AbnexpError exits with its one line."""
    from abnexp.engine.trainer import train

    try:
        return train(cfg, run_dir)
    except AbnexpError as e:
        _fail(e)


def _train_main(cfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from abnexp.engine.distributed import dist_env
    from abnexp.engine.launch import launch, share_job

    run_dir = HydraConfig.get().runtime.output_dir
    if dist_env().distributed:  # rank 0 under torchrun: the other ranks train the config it sends
        metrics = share_job(cfg, run_dir, run_training)
    elif cfg.launcher.nproc_per_node != 1:  # abnexp starts torchrun itself
        try:
            metrics = launch(cfg, run_dir)
        except AbnexpError as e:
            _fail(e)
    else:
        metrics = run_training(cfg, run_dir)
    return metrics.get("top1")


def train_command(argv: list[str]) -> None:
    """Runs Hydra's main on the packaged config tree (configs/, shipped as abnexp.configs)."""
    import hydra

    from abnexp.config import register_configs
    from abnexp.engine.distributed import dist_env

    register_configs()
    main = hydra.main(version_base="1.3", config_path="pkg://abnexp.configs", config_name="config")(_train_main)
    sys.argv = ["abnexp-train", *argv]
    if dist_env().distributed:  # started by torchrun: only rank 0 composes (abnexp.engine.launch)
        from abnexp.engine.launch import run_ranks

        run_ranks(main, run_training)
    else:
        main()


def eval_command(argv: list[str]) -> None:
    from abnexp.eval.run import run_eval

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    checkpoint = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    if len(checkpoint) != 1:
        _fail(AbnexpError("usage: abnexp eval checkpoint=<run dir>/checkpoints/last.pt [key=value ...]"))
    try:
        run_eval(checkpoint[0], [a for a in argv if not a.startswith("checkpoint=")])
    except AbnexpError as e:
        _fail(e)


def list_command(argv: list[str]) -> None:
    from abnexp.report.experiments import experiments, format_list

    print(format_list(experiments()))


def table_command(argv: list[str]) -> None:
    from pathlib import Path

    from abnexp.report.experiments import experiments
    from abnexp.report.tables import write_tables

    if argv[:1] == ["memory"]:
        from abnexp.report.memory_report import memory_table

        try:
            print(f"wrote {memory_table(Path('results/memory.md'), argv[1:])}")
        except AbnexpError as e:
            _fail(e)
        return
    out = Path(next((a.split("=", 1)[1] for a in argv if a.startswith("out=")), "results/tables"))
    paths = [a for a in argv if not a.startswith("out=")]
    if not paths:
        _fail(AbnexpError("usage: abnexp table RUN_DIR|SWEEP_DIR [...] [out=results/tables]"))
    try:
        written = write_tables(paths, out, experiments())
    except AbnexpError as e:
        _fail(e)
    if not written:
        _fail(AbnexpError(f"no runs with eval.json under {' '.join(paths)}: run `abnexp eval checkpoint=...` first"))
    for path in written:
        print(f"wrote {path}")


def memory_command(argv: list[str]) -> None:
    from abnexp.report.memory_report import memory_command as run

    try:
        run(argv)
    except AbnexpError as e:
        _fail(e)


def data_command(argv: list[str]) -> None:
    from abnexp.data.check import data_command as run

    try:
        code = run(argv)
    except AbnexpError as e:
        _fail(e)
    sys.exit(code)


def kernels_command(argv: list[str]) -> None:
    from abnexp.norm.kernels_cli import main as run

    run(argv)


COMMANDS = {"train": train_command, "eval": eval_command, "list": list_command, "table": table_command,
            "memory": memory_command, "data": data_command, "kernels": kernels_command}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])
