"""``abnexp train [overrides]``: Hydra's main on the packaged config tree (configs/, shipped as
abnexp.configs): one run dir per job, ``-m`` sweeps, ``--cfg job``; under torchrun only rank 0
composes (:mod:`abnexp.commands.launch`)."""
from __future__ import annotations

import sys

from hydra.core.hydra_config import HydraConfig

from abnexp.commands.launch import launch, run_ranks, run_training, share_job
from abnexp.config import register_configs, renamed_recipe
from abnexp.engine.distributed import dist_env
from abnexp.errors import AbnexpError, ConfigError, exit_with


def _train_main(cfg) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    if dist_env().distributed:  # rank 0 under torchrun: the other ranks train the config it sends
        metrics = share_job(cfg, run_dir, run_training)
    elif cfg.launcher.nproc_per_node != 1:  # abnexp starts torchrun itself
        try:
            metrics = launch(cfg, run_dir)
        except AbnexpError as e:  # inside Hydra's main: exit with the one line, as run_training does
            exit_with(e)
    else:
        metrics = run_training(cfg, run_dir)
    return metrics.get("top1")


def _check_recipe_names(argv: list[str]) -> None:
    """A recipe that moved into a family folder is named by its new name before Hydra starts."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "experiment" and renamed_recipe(value):
            raise ConfigError(f"experiment={value} has moved: use experiment={renamed_recipe(value)}")


def train_command(argv: list[str]) -> None:
    """Runs Hydra's main with ``argv`` as its command line.

    Raises:
        ConfigError: a recipe's old name (the message names the new one).
    """
    import hydra

    _check_recipe_names(argv)
    register_configs()
    main = hydra.main(version_base="1.3", config_path="pkg://abnexp.configs", config_name="config")(_train_main)
    sys.argv = ["abnexp-train", *argv]
    if dist_env().distributed:  # started by torchrun: only rank 0 composes
        run_ranks(main, run_training)
    else:
        main()
