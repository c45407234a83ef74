"""The interface between a task (``task=``) and the trainer / ``abnexp eval``.

A task turns the composed config into a model, datasets, a loss and evaluation protocols; the
trainer (abnexp.engine.trainer) and the eval command run any task through :class:`Task` alone.
Optional parts are declared with a default here, never probed: :attr:`Task.collate_fn` (None:
PyTorch's default collation) and :meth:`Task.train_batch_sampler` (plain batches of the
resumable sampler).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler


@dataclass(frozen=True)
class RunContext:
    """Where and how a step runs: ``device``; ``amp_dtype`` (torch.float16 / torch.bfloat16 under
    autocast, None = float32); ``channels_last`` (inputs converted to that memory format)."""

    device: torch.device = torch.device("cpu")
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (N, 3, H, W) on :attr:`device`, in channels_last if configured."""
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


class Task:
    """Base of every task: what the trainer and ``abnexp eval`` call.

    Subclasses set :attr:`options` (their schema, the ``task=`` option's keys) in the tasks table
    and implement the methods that raise NotImplementedError here.
    """

    collate_fn: Optional[Callable[[list], Any]] = None
    """Collation of a list of samples into a batch; None = PyTorch's default."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        """The configured model (raises ConfigError for an invalid model / norm setting)."""
        raise NotImplementedError

    def datasets(self) -> tuple[Dataset, Dataset]:
        """(train, val) datasets (raises DatasetError for a missing / malformed root)."""
        raise NotImplementedError

    def train_batch_sampler(self, sampler: Sampler[int], batch_size: int) -> Sampler[list[int]]:
        """Training batches drawn from the trainer's resumable ``sampler`` (call after datasets());
        default: consecutive indices, the last incomplete batch dropped."""
        return BatchSampler(sampler, batch_size, drop_last=True)

    def loss(self, model: nn.Module, batch, ctx: RunContext) -> tuple[torch.Tensor, int]:
        """(scalar training loss of ``batch``, number of images in it)."""
        raise NotImplementedError

    def validate(self, model: nn.Module, loader: DataLoader, ctx: RunContext) -> dict:
        """Validation metrics during training, e.g. {"top1", "top5", "num_samples"}; the first key is
        the task's main metric."""
        raise NotImplementedError

    def evaluate_protocols(self, model: nn.Module, ctx: RunContext,
                           make_loader: Callable[[Dataset, bool], DataLoader]) -> dict:
        """``abnexp eval``: {protocol name: metrics}; ``make_loader(dataset, ten_crop)`` shards a
        validation set over the processes."""
        raise NotImplementedError

    def format_table(self, results: dict) -> str:
        """Markdown table of :meth:`evaluate_protocols`' results, printed by ``abnexp eval``."""
        raise NotImplementedError
