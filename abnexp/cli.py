"""The ``abnexp`` command: ``abnexp <command> [key=value ...]`` (also ``python -m abnexp``).

Commands (one explicit table, COMMANDS):
  train   train a model; Hydra overrides (model=resnext101 norm=inplace_abn data.root=...),
          -m/--multirun sweeps, --cfg job prints the composed config
  eval    evaluate a checkpoint: abnexp eval checkpoint=<run dir>/checkpoints/last.pt [overrides]
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


def _train_main(cfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from abnexp.engine.trainer import train

    try:
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    except AbnexpError as e:
        _fail(e)
    return metrics.get("top1")


def train_command(argv: list[str]) -> None:
    """Runs Hydra's main on the packaged config tree (configs/, shipped as abnexp.configs)."""
    import hydra

    from abnexp.config import register_configs

    register_configs()
    main = hydra.main(version_base="1.3", config_path="pkg://abnexp.configs", config_name="config")(_train_main)
    sys.argv = ["abnexp-train", *argv]
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


COMMANDS = {"train": train_command, "eval": eval_command}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])
