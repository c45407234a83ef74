"""Deterministic, resumable data order: the same samples and augmentations whatever the number
of workers, and an exact continuation when a run resumes mid-epoch.

- :class:`SeededDataset` draws the random augmentation of sample ``i`` in epoch ``e`` from a
  torch RNG seeded with (seed, e, i), so augmentation does not depend on worker assignment.
- :class:`ResumableSampler` wraps torch's DistributedSampler (a shuffled permutation seeded by
  seed + epoch, sharded over ranks) and can start an epoch at an offset.
- :class:`ShardSampler` splits an evaluation set over ranks without DistributedSampler's
  padding, so every sample is counted exactly once.
"""
from __future__ import annotations

import itertools

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


class SeededDataset(Dataset):
    """``dataset[i]`` computed under ``torch.manual_seed(f(seed, epoch, i))``; global RNG untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed % (2**63))
            return self.dataset[index]


class ResumableSampler(Sampler):
    """Shuffled indices of one rank's shard for an epoch, optionally skipping the first ``start``."""

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0):
        self.sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                                          seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch's permutation; ``start`` samples (of this rank) are skipped."""
        self.sampler.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.start, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)


class ShardSampler(Sampler):
    """Rank ``rank``'s contiguous slice of ``range(num_samples)``, in order (as detectron2's
    InferenceSampler): the shards are disjoint, cover every index once, and differ in length by
    at most one; no padding, so a rank may get fewer samples (or none)."""

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0):
        self.begin = num_samples * rank // num_replicas
        self.end = num_samples * (rank + 1) // num_replicas

    def __iter__(self):
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin
