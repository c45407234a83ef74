"""Deterministic, resumable data order: the same samples and augmentations whatever the number
of workers, and an exact continuation when a run resumes mid-epoch.

- :class:`SeededDataset` draws the random augmentation of sample ``i`` in epoch ``e`` from a
  torch RNG seeded with (seed, e, i), so augmentation does not depend on worker assignment.
- :class:`EpochBatches` tags each index of a batch with the epoch, the key SeededDataset takes.
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
    """``dataset[(e, i)]`` is ``dataset[i]`` computed with torch's CPU generator seeded f(seed, e, i): the
    augmentation of sample ``i`` in epoch ``e``, whichever worker draws it; global RNG untouched.

    The epoch travels with the index (:class:`EpochBatches` tags each index with it) rather than
    living in the dataset, so persistent DataLoader workers, which keep their copy of the dataset
    from one epoch to the next, still see each epoch's augmentation.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        with torch.random.fork_rng(devices=[]):  # the CPU generator only, the one the transforms draw from
            torch.default_generator.manual_seed(sample_seed % (2**63))
            return self.dataset[index]


class ResumableSampler(Sampler):
    """Shuffled indices of one rank's shard for an epoch, optionally skipping the first ``start``."""

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0):
        self.sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                                          seed=seed, drop_last=False)
        self.start = 0
        self.epoch = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch's permutation; ``start`` samples (of this rank) are skipped."""
        self.sampler.set_epoch(epoch)
        self.start = start
        self.epoch = epoch

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.start, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)


class EpochBatches(Sampler):
    """The batches of ``batches`` (lists of dataset indices drawn from ``sampler``) with each index
    tagged by ``sampler``'s current epoch, ``[(epoch, i), ...]``: the keys of a :class:`SeededDataset`."""

    def __init__(self, batches: Sampler[list[int]], sampler: ResumableSampler):
        self.batches = batches
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        for batch in self.batches:
            yield [(epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


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
