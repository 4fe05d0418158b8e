"""Which samples each step sees: seeded shards of the data, optional aspect-ratio grouping, and
exact mid-epoch resume by skipping whole batches.

The order depends only on the seed, the epoch and the world size: a run killed and resumed skips
exactly the micro-batches it had consumed and then continues as the uninterrupted run would.
"""
from __future__ import annotations

from typing import Iterator, Sequence

from torch.utils.data import DistributedSampler, Sampler

__all__ = ["ShardSampler", "GroupedBatchSampler", "SkipBatchSampler", "training_batches"]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: evaluation shards without padding or repeats."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of one aspect-ratio group (``groups[i]``: the group of sample ``i``, e.g. landscape
    vs portrait), in the order the ``sampler`` yields them, so a batch pads little.

    A batch is emitted as soon as its group has ``batch_size`` samples; the leftovers of all groups
    are batched together at the end, and an incomplete last batch is dropped: an epoch always has
    ``len(sampler) // batch_size`` batches, on every rank alike.
    """

    def __init__(self, sampler: Sampler[int], groups: Sequence[int], batch_size: int):
        self.sampler, self.groups, self.batch_size = sampler, list(groups), int(batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        pending: dict[int, list[int]] = {}
        for index in self.sampler:
            bucket = pending.setdefault(self.groups[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()
        rest = [i for bucket in pending.values() for i in bucket]
        for start in range(0, len(rest) - self.batch_size + 1, self.batch_size):
            yield rest[start:start + self.batch_size]

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


def training_batches(sampler: DistributedSampler, batch_size: int, groups: Sequence[int] | None = None) -> Sampler[list[int]]:
    """Full batches of ``batch_size`` from ``sampler`` (aspect-ratio grouped when ``groups`` is
    given); an incomplete last batch is dropped."""
    if groups is not None:
        return GroupedBatchSampler(sampler, groups, batch_size)
    from torch.utils.data import BatchSampler

    return BatchSampler(sampler, batch_size, drop_last=True)


class SkipBatchSampler(Sampler[list[int]]):
    """``batch_sampler`` without its first ``skip`` batches (set per epoch; nothing is loaded for
    the skipped ones)."""

    def __init__(self, batch_sampler: Sampler[list[int]]):
        self.batch_sampler = batch_sampler
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.skip
