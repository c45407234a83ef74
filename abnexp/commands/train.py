"""``abnexp train [overrides]``: Hydra's main on the packaged config tree (configs/, shipped as
abnexp.configs): one run dir per job, ``-m`` sweeps, ``--cfg job``; under torchrun only rank 0
composes (:mod:`abnexp.commands.launch`)."""
from __future__ import annotations

import sys

from hydra.core.hydra_config import HydraConfig

from abnexp.commands.launch import launch, run_ranks, run_training, share_job
from abnexp.config import compose, register_configs, validate
from abnexp.distributed import dist_env
from abnexp.errors import AbnexpError, exit_with


def _train_main(cfg) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        validate(cfg)
    except AbnexpError as e:
        exit_with(e)
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


FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-dir", "-cd", "--config-name", "-cn",
                    "--info", "--experimental-rerun")


def check_before_start(argv: list[str]) -> None:
    """Composes and validates a single run's overrides before Hydra creates its run dir, so a refused
    config leaves no run dir; a sweep (-m) is validated job by job in :func:`_train_main`.

    Raises:
        ConfigError: a composition error or a value out of its range (abnexp.config.validate).
    """
    if {"-m", "--multirun", "--help", "-h", "--hydra-help"} & set(argv):
        return
    overrides, skip = [], False
    for arg in argv:
        if skip or arg.startswith("-"):
            skip = arg in FLAGS_WITH_VALUE and not skip
            continue
        if not arg.split("=", 1)[0].lstrip("+~").startswith("hydra"):
            overrides.append(arg)
    validate(compose(overrides))


def train_command(argv: list[str]) -> None:
    """Runs Hydra's main with ``argv`` as its command line.

    Raises:
        ConfigError: (before Hydra starts) see :func:`check_before_start`.
    """
    import hydra

    if not dist_env().distributed:  # under torchrun rank 0 validates in the job and ends every rank
        check_before_start(argv)
    register_configs()
    main = hydra.main(version_base="1.3", config_path="pkg://abnexp.configs", config_name="config")(_train_main)
    sys.argv = ["abnexp-train", *argv]
    if dist_env().distributed:  # started by torchrun: only rank 0 composes
        run_ranks(main, run_training)
    else:
        main()
