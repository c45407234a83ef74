"""``abnexp train [overrides]``: Hydra's main on the packaged config tree (configs/, shipped as
abnexp.configs): one run dir per job, ``-m`` sweeps, ``--cfg job``; under torchrun only rank 0
composes (:mod:`abnexp.commands.launch`); with ``-m hydra/launcher=submitit_slurm|submitit_local``
every task of a sweep job's submitit job composes it alike and trains it (:func:`_submitit_task`)."""
from __future__ import annotations

import logging
import sys
import warnings

from hydra.core.hydra_config import HydraConfig

from abnexp.commands.launch import configure_logging, launch, run_ranks, run_training, share_job
from abnexp.config import compose, register_configs, validate
from abnexp.data import dataset_root
from abnexp.distributed import DistEnv, destroy_distributed, dist_env
from abnexp.errors import AbnexpError, exit_with

log = logging.getLogger("abnexp")

# configs/hydra/launcher/submitit_{slurm,local}.yaml replace the plugin's options of the same name on
# purpose: Hydra validates them against the plugin's schema, and warns that it does. At import, so that
# it applies in the submitit tasks too (they import this module to unpickle the task function).
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_\w+' is validated against ConfigStore")


def _submitit_task(cfg, run_dir, env: DistEnv) -> dict:
    """One task of a submitit job (``hydra/launcher=submitit_slurm`` / ``submitit_local``): the
    launcher ran Hydra's job in every task, alike (same overrides, same sweep dir), so each task
    trains it, rank and rendezvous from submitit's environment (abnexp.distributed); tasks > 0 log
    warnings only (Hydra set up their logging to the same train.log)."""
    if env.rank:
        configure_logging(env.rank)
    log.info("submitit job: world size %d (one training process per task)", env.world_size)
    try:
        return run_training(cfg, run_dir)
    finally:
        destroy_distributed()


def _train_main(cfg) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        validate(cfg)
    except AbnexpError as e:
        exit_with(e)
    env = dist_env()
    if env.distributed and env.started_by == "submitit":  # every task of the job composed this job
        metrics = _submitit_task(cfg, run_dir, env)
    elif env.distributed:  # rank 0 under torchrun: the other ranks train the config it sends
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
    """Composes and validates a single run's overrides, and checks its dataset root (unless only
    printing the config: ``--cfg`` / ``--info``), before Hydra creates its run dir, so a refused
    config or a missing / truncated dataset leaves no run dir; a sweep (-m) is validated job by job
    in :func:`_train_main`.

    Raises:
        ConfigError: a composition error or a value out of its range (abnexp.config.validate).
        DatasetError: the dataset's root check (abnexp.data.dataset_root) failed.
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
    cfg = compose(overrides)
    validate(cfg)
    if not {"--cfg", "-c", "--info"} & set(argv):
        dataset_root(cfg.data.name, cfg.data.root)


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
