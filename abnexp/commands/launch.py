"""Multi-process training: one config composition and one run dir per job.

Hydra's main run by every rank would compose the config once per rank and create one run dir
per rank (timestamps differ). So exactly one process composes, and the others receive the
resolved config and the run dir:

* ``torchrun [--nnodes ... --rdzv-*] --nproc_per_node=N -m abnexp train [overrides]``: every
  rank joins the process group; global rank 0 alone runs Hydra's main (config, run dir,
  ``.hydra/``, ``train.log``) and broadcasts each job (resolved config YAML, run dir) to the
  others, which train it (:func:`run_ranks`). Hydra multirun sweeps work the same way, job by
  job; ``--cfg job`` or a composition error end every rank.
* ``abnexp train launcher.nproc_per_node=N``: this process composes the config, creates the run
  dir, writes the resolved ``config.yaml`` there and starts
  ``torchrun --standalone --nproc_per_node=N -m abnexp.commands.launch RUN_DIR``; each worker reads
  that file (:func:`launch`, :func:`worker_main`). One node; for several, use torchrun directly.

Only rank 0 writes logs, TensorBoard and checkpoints (abnexp.engine.trainer); ranks > 0 log
warnings only. Multi-node runs need the run dir on a filesystem shared by the nodes (every
rank resumes from the same checkpoint file), as torchvision's reference scripts assume.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from abnexp.config import compose
from abnexp.distributed import broadcast_object, destroy_distributed, init_distributed
from abnexp.errors import AbnexpError, ConfigError, exit_with

log = logging.getLogger("abnexp")

_job_running = False  # rank 0 (torchrun -m abnexp train): a broadcast job has not finished yet


class LaunchError(AbnexpError):
    """The worker processes started by ``launcher.nproc_per_node`` failed."""


def resolved_config(yaml_text: str):
    """A resolved config YAML (as written to ``<run dir>/config.yaml``) typed by the schema."""
    return compose(run=yaml_text)


def run_training(cfg, run_dir) -> dict:
    """Trains ``cfg`` in ``run_dir`` in this process (every rank runs it); returns the last
    validation metrics. An AbnexpError exits with its one line (SystemExit passes through Hydra)."""
    from abnexp.engine.trainer import train

    try:
        return train(cfg, run_dir)
    except AbnexpError as e:
        exit_with(e)


def configure_logging(rank: int, run_dir: str | Path | None = None) -> None:
    """Rank 0: INFO to the console and, given ``run_dir``, appended to its train.log (where the
    process did not run Hydra's logging set-up); ranks > 0: warnings only, tagged with the rank."""
    fmt = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if rank == 0 and run_dir is not None:
        handlers.append(logging.FileHandler(Path(run_dir) / "train.log"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=fmt if rank == 0 else f"[rank {rank}]{fmt}", handlers=handlers, force=True)


def run_ranks(hydra_main: Callable[[], None], run_job: Callable) -> None:
    """``abnexp train`` under torchrun: rank 0 runs ``hydra_main`` (whose task function calls
    :func:`share_job`); the other ranks run ``run_job(cfg, run_dir)`` for each job received,
    and exit with rank 0's exit code when it is done."""
    env = init_distributed()
    if env.rank != 0:
        configure_logging(env.rank)
        while True:
            message = broadcast_object()
            if message[0] == "end":
                destroy_distributed()
                if message[1]:
                    sys.exit(message[1])
                return
            run_job(resolved_config(message[1]), message[2])
    code: int | str | None = 0
    try:
        hydra_main()
    except SystemExit as e:
        code = e.code
        raise
    except BaseException:
        code = 1
        raise
    finally:  # a job that failed midway leaves the others in a collective: torchrun stops them
        if not _job_running:
            broadcast_object(("end", code if isinstance(code, int) else (0 if code is None else 1)))
            destroy_distributed()


def share_job(cfg, run_dir: str | Path, run_job: Callable):
    """On rank 0 (inside Hydra's main): sends (resolved config, run dir) to the other ranks and
    runs the job here too; returns ``run_job``'s result."""
    global _job_running
    broadcast_object(("job", OmegaConf.to_yaml(cfg, resolve=True), str(run_dir)))
    _job_running = True
    result = run_job(cfg, run_dir)
    _job_running = False
    return result


def torchrun_command(nproc_per_node: int, run_dir: Path) -> list[str]:
    """The command :func:`launch` runs: single-node torchrun with a free rendezvous port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc_per_node}", "-m", "abnexp.commands.launch", str(run_dir)]


def last_val_metrics(run_dir: Path) -> dict:
    """The last validation row of ``<run dir>/metrics.jsonl`` ({} if none)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    val = [r for r in rows if r.get("split") == "val"]
    return {k: v for k, v in val[-1].items() if k not in ("split", "step", "epoch")} if val else {}


def launch(cfg, run_dir: str | Path) -> dict:
    """``launcher.nproc_per_node=N`` without torchrun: starts N worker processes on this node
    that train ``cfg`` in ``run_dir``; returns the last validation metrics.

    Raises:
        ConfigError: ``launcher.nproc_per_node`` < 1.
        LaunchError: a worker failed (its message is printed above by the worker).
    """
    n = cfg.launcher.nproc_per_node
    if n < 1:
        raise ConfigError(f"launcher.nproc_per_node={n}; use 1 (one process) or more")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    command = torchrun_command(n, run_dir)
    log.info("starting %d training processes: %s", n, " ".join(command))
    code = subprocess.call(command)
    if code != 0:
        raise LaunchError(f"the {n} training processes failed (torchrun exit code {code}; their "
                          f"messages are above); run dir {run_dir}")
    return last_val_metrics(run_dir)


def worker_main(run_dir: str) -> None:
    """A worker started by :func:`launch`: trains ``<run_dir>/config.yaml`` in ``run_dir``."""
    env = init_distributed()
    configure_logging(env.rank, run_dir)
    try:
        run_training(resolved_config((Path(run_dir) / "config.yaml").read_text()), run_dir)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    worker_main(sys.argv[1])
