"""What training and ``abnexp eval`` share: the device, the run context, validation loaders."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from abnexp.config import choice
from abnexp.data.sampling import ShardSampler
from abnexp.distributed import DistEnv
from abnexp.errors import ConfigError
from abnexp.tasks.base import RunContext

AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
"""``amp=`` -> autocast dtype (None: float32)."""


def select_device(name: str, env: DistEnv) -> torch.device:
    """``device=``: ``auto`` → this process's CUDA device (LOCAL_RANK) if CUDA is available, else the CPU.

    Raises:
        ConfigError: ``cuda`` without a visible GPU, a LOCAL_RANK without a GPU of its own, or an
            unknown name.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process LOCAL_RANK={env.local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                              f"visible): start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    if name != "cpu":
        raise ConfigError(f"device={name!r}; valid: auto, cpu, cuda")
    return torch.device("cpu")


def run_context(cfg, env: DistEnv) -> RunContext:
    """The :class:`RunContext` of ``cfg`` (device=, amp=, channels_last=) in this process."""
    return RunContext(select_device(cfg.device, env), AMP_DTYPES[choice(cfg.amp)], bool(cfg.channels_last))


def make_eval_loader(dataset, cfg, ten_crop: bool = False, env: DistEnv = DistEnv(), collate_fn=None) -> DataLoader:
    """Sequential loader over this rank's shard of a validation set (every sample on exactly one
    rank, no padding; ten-crop batches hold 10× the images); ``collate_fn``: the task's."""
    batch = max(1, cfg.data.batch_size // (10 if ten_crop else 1))
    return DataLoader(dataset, batch_size=batch, sampler=ShardSampler(len(dataset), env.world_size, env.rank),
                      num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(), collate_fn=collate_fn)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile's wrapper and DistributedDataParallel (or ``model`` itself)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule keeps the module there
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
