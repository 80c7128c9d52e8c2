"""Training samplers that give each process its own share of the data (zip ``part`` cache, tar shards).

Like ``data.build.ResumableDistributedSampler`` they are reproducible (the order is a function of the seed and the
epoch), resumable (``start_index`` skips the batches an interrupted epoch already trained) and hand every index over
with the seed of its random transforms, derived from (seed, epoch, position in the epoch's global order), and every
process gets the same number of samples (a share shorter than the longest is padded with its own first samples, as
``DistributedSampler`` pads), so every process runs the same number of steps.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from utils import derive_seed


ORDER_TAG = 2**62


class ResumableShareSampler(Sampler):
    """Base: ``share(epoch)`` is this process's list of indices for an epoch, of length ``num_samples``."""

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int) -> None:
        self.num_samples, self.rank, self.world_size, self.seed = num_samples, rank, world_size, seed
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def share(self, epoch: int) -> list[int]:
        raise NotImplementedError

    def _generator(self, epoch: int, *parts: int) -> torch.Generator:
        """A generator for an epoch's order, apart from every per-sample seed (those have 3 parts, the last a
        position; ``ORDER_TAG`` is beyond any position and never a trailing zero, which SeedSequence ignores)."""
        return torch.Generator().manual_seed(derive_seed(self.seed, epoch, *parts, ORDER_TAG))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self.share(self.epoch)
        assert len(indices) == self.num_samples
        for i in range(self.start_index, len(indices)):
            yield indices[i], derive_seed(self.seed, self.epoch, i * self.world_size + self.rank)

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def _pad(indices: list[int], length: int) -> list[int]:
    """``indices`` repeated from its start up to ``length`` items."""
    if not indices:
        raise ValueError('an empty share cannot be padded')
    return (indices * math.ceil(length / len(indices)))[:length]


class StridedShareSampler(ResumableShareSampler):
    """Rank r of W owns items r, r+W, r+2W, ... (the items Swin's ``--cache-mode part`` caches on that rank) and
    samples a fresh permutation of them every epoch, drawn from (seed, epoch, rank): Swin's ``SubsetRandomSampler``
    made reproducible and resumable. Shares are padded to ceil(N / W)."""

    def __init__(self, num_items: int, rank: int, world_size: int, seed: int) -> None:
        super().__init__(math.ceil(num_items / world_size), rank, world_size, seed)
        self.owned = list(range(rank, num_items, world_size))

    def share(self, epoch: int) -> list[int]:
        order = torch.randperm(len(self.owned), generator=self._generator(epoch, self.rank)).tolist()
        return _pad([self.owned[k] for k in order], self.num_samples)


class ShardShareSampler(ResumableShareSampler):
    """Tar shards: every epoch the shards are put in a new order (drawn from (seed, epoch)) and their samples laid
    end to end; rank r of W takes the r-th of W equal runs of that sequence (so it reads whole shards of its own,
    and shares at most the two shards at its run's ends with its neighbours). Within its run it shuffles the samples
    of every ``window`` consecutive shards together (a shuffle buffer of ``window`` shards: each worker then keeps a
    few shards open at a time). Runs are padded to ceil(N / W) with their own first samples.

    ``lengths``: samples per shard, in the order of the data set's global indices."""

    def __init__(self, lengths: Sequence[int], rank: int, world_size: int, seed: int, window: int = 4) -> None:
        total = sum(lengths)
        super().__init__(math.ceil(total / world_size), rank, world_size, seed)
        self.lengths, self.window = list(lengths), window
        self.starts = [0, *itertools.accumulate(self.lengths)][:-1]

    def share(self, epoch: int) -> list[int]:
        order = torch.randperm(len(self.lengths), generator=self._generator(epoch)).numpy()
        lengths = np.asarray(self.lengths, dtype=np.int64)[order]
        shard = np.repeat(order, lengths)                                           # shard of each position
        index = np.concatenate([np.arange(self.starts[k], self.starts[k] + self.lengths[k]) for k in order])
        total = len(index)
        lo, hi = self.rank * total // self.world_size, (self.rank + 1) * total // self.world_size
        shard, index = shard[lo:hi], index[lo:hi]
        first = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])                # where each shard's piece starts
        bounds = np.r_[first[::self.window], len(index)]                            # windows of `window` pieces
        shuffle = self._generator(epoch, self.rank)
        out: list[int] = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            out.extend(index[a + torch.randperm(int(b - a), generator=shuffle).numpy()].tolist())
        return _pad(out, self.num_samples)


class ContiguousSampler(Sampler):
    """Evaluation: rank r of W takes the r-th of W contiguous runs of the items, in order: every item once over all
    ranks, no padding (for shards, each rank reads whole shards of its own)."""

    def __init__(self, num_items: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank * num_items // world_size, (rank + 1) * num_items // world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableDistributedSampler(DistributedSampler):
    """The training sampler of the official code (``DistributedSampler``, shuffled by (seed, epoch), padded to equal
    shares), which can start after the first ``start_index`` items of this rank's share (mid-epoch resume; same
    order as an uninterrupted epoch; ``start_index`` resets to 0 after use), and hands each index over with the seed
    of its random transforms, derived from (seed, epoch, position in the epoch's global order).

    Positions are global (rank r of W takes positions r, r + W, ...), so a sample's augmentation depends on the
    epoch and the data order only, not on the process count, the batch size or the worker count.
    """

    def __init__(self, dataset: Dataset, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.start_index = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())  # this rank's share, in the official order
        for i in range(self.start_index, len(indices)):
            position = i * self.num_replicas + self.rank
            yield indices[i], derive_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``W`` takes items ``r, r+W, r+2W, ...``: no padding, no duplicates, in order."""

    def __init__(self, num_items: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, num_items, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
