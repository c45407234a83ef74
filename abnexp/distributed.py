"""torch.distributed basics: this process's rank, world size and local rank, read from the
environment of whatever started it (:data:`STARTERS`: torchrun, else a submitit job, e.g. one
task of ``abnexp train -m hydra/launcher=submitit_slurm``).

Without either, everything runs as a single process (rank 0 of 1).
"""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from abnexp.errors import ConfigError

log = logging.getLogger("abnexp")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_by: str | None = None
    """The :data:`STARTERS` entry the values come from ("torchrun", "submitit"); None: one process."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _torchrun_env() -> DistEnv | None:
    """torchrun's RANK, WORLD_SIZE, LOCAL_RANK (also set by ``srun torchrun ...``)."""
    if "RANK" not in os.environ:
        return None
    return DistEnv(int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)), "torchrun")


def _submitit_env() -> DistEnv | None:
    """A task of a submitit job (SUBMITIT_EXECUTOR is set in it: slurm or local): its global rank,
    number of tasks and local rank, from submitit's JobEnvironment (on SLURM: SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit

    job = submitit.JobEnvironment()
    return DistEnv(job.global_rank, job.num_tasks, job.local_rank, "submitit")


STARTERS: dict[str, Callable[[], DistEnv | None]] = {"torchrun": _torchrun_env, "submitit": _submitit_env}
"""Where the rank comes from, in order of precedence: torchrun's variables win over a submitit
job's (``srun torchrun`` inside a job; an ``abnexp train launcher.nproc_per_node=N`` worker)."""


def dist_env() -> DistEnv:
    """This process's rank, world size and local rank: from the first of :data:`STARTERS` whose
    environment is present, else rank 0 of 1."""
    for read in STARTERS.values():
        env = read()
        if env is not None:
            return env
    return DistEnv()


def preemption_signal() -> int | None:
    """The signal submitit sends before a job's time limit (and on ``job._interrupt()``) when this
    process is a submitit task: SIGUSR2 by default, ``$SUBMITIT_PREEMPT_SIGNAL`` to change it
    (submitit.JobEnvironment.USR_SIG); None outside submitit."""
    if dist_env().started_by != "submitit":
        return None
    import submitit

    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


def init_distributed() -> DistEnv:
    """Initializes the default process group when the world size is > 1 (torchrun or a
    submitit job); a no-op for a single process or when it is already initialized.

    The backend does not depend on the configured device, so the group can exist before the
    config is known (abnexp.commands.launch hands rank 0's config over it): with CUDA,
    "cpu:gloo,cuda:nccl" (nccl for CUDA tensors, gloo for CPU tensors) after selecting the
    GPU LOCAL_RANK; without CUDA, gloo. Rendezvous: torchrun's MASTER_ADDR/PORT (in its agent's
    store, under a prefix per restart: :func:`_attempt_store`); in a submitit
    job, unless set already, the job's first host and a port derived from the job id
    (submitit.helpers.TorchDistributedEnvironment, the same on every task).
    """
    env = dist_env()
    if env.distributed and not dist.is_initialized():
        if env.started_by == "submitit":
            import submitit.helpers

            rendezvous = submitit.helpers.TorchDistributedEnvironment()
            os.environ.setdefault("MASTER_ADDR", rendezvous.master_addr)
            os.environ.setdefault("MASTER_PORT", str(rendezvous.master_port))
        backend = "gloo"
        if torch.cuda.is_available() and env.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(env.local_rank)
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, store=_attempt_store(env), rank=env.rank, world_size=env.world_size)
    return env


def _attempt_store(env: DistEnv) -> dist.Store | None:
    """The store this attempt's process group rendezvous in; None: init_process_group's own (env://).

    torchrun's agent hosts the store its workers rendezvous in (TORCHELASTIC_USE_AGENT_STORE=True)
    and keeps it across ``--max-restarts`` restarts, keys included (pytorch/pytorch#135712). Without
    a prefix of their own, the restarted workers read the killed workers' entries (gloo's listening
    addresses, nccl's unique id) and fail to connect ("Gloo connectFullMesh failed ... Connection
    refused") whenever they read a peer's key before the restarted peer has written it. Each
    attempt therefore rendezvous under the prefix ``abnexp/attempt_<TORCHELASTIC_RESTART_COUNT>``.
    The count is the same on every worker of one agent (one node); across nodes agents count their
    restarts apart, so multi-node elastic jobs should run torchrun with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per attempt, hosted by rank 0; then this
    returns None), which rank 0 says in a warning.
    """
    if env.started_by != "torchrun" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
    if env.is_main and nodes > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)):
        log.warning("torchrun --max-restarts over %d nodes shares its store across restarts, which the nodes "
                    "count apart: a restart may fail to connect. Run torchrun with "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", nodes)
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                          is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"abnexp/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)


def destroy_distributed() -> None:
    """Destroys the default process group, if there is one, before the process exits: a gloo /
    nccl group left to the interpreter's shutdown can abort the process ("terminate called without
    an active exception", exit code -6), which torchrun reports as a failed job."""
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj=None, src: int = 0):
    """``obj`` as given on rank ``src``, returned on every rank (pickled, sent over the CPU
    backend); returns ``obj`` unchanged without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over all processes in place (identity without a process group). Pass a
    tensor on the training device: nccl reduces CUDA tensors only."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def sync_group(size: int, env: DistEnv):
    """This rank's group of ``size`` consecutive ranks (ranks 0..size-1, size..2·size-1, ...;
    e.g. the GPUs of one node), for synchronized normalization; None (all ranks) for size 0
    or the world size. A collective: every rank calls it.

    Raises:
        ConfigError: ``size`` does not divide the world size.
    """
    if size in (0, env.world_size):
        return None
    if size < 0 or env.world_size % size:
        raise ConfigError(f"launcher.sync_group_size={size} does not divide the {env.world_size} processes; "
                          f"use 0 (all) or a divisor")
    return dist.new_subgroups(size)[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
