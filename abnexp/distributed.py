"""torch.distributed basics, read from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

Without those variables everything runs as a single process (rank 0 of 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from abnexp.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    """This process's rank, world size and local rank from torchrun's environment variables."""
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed() -> DistEnv:
    """Initializes the default process group when launched by torchrun with WORLD_SIZE > 1;
    a no-op for a single process or when it is already initialized.

    The backend does not depend on the configured device, so the group can exist before the
    config is known (abnexp.commands.launch hands rank 0's config over it): with CUDA,
    "cpu:gloo,cuda:nccl" (nccl for CUDA tensors, gloo for CPU tensors) after selecting the
    GPU LOCAL_RANK; without CUDA, gloo. Rendezvous comes from torchrun's MASTER_ADDR/PORT.
    """
    env = dist_env()
    if env.distributed and not dist.is_initialized():
        if torch.cuda.is_available() and env.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(env.local_rank)
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return env


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
