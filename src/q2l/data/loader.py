"""Data loaders with an order that depends only on (seed, epoch): reproducible and resumable.

The sampler shards by rank for DDP and can start part-way through an epoch, so a run resumed from
a mid-epoch checkpoint sees exactly the batches the uninterrupted run would have. For training it
yields `SampleKey`s (index, seed, epoch) rather than bare indices, so the dataset seeds each
sample's augmentation from them and the tensors do not depend on num_workers.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from q2l.data.dataset import MultiLabelImageDataset
from q2l.data.device_decode import EncodedImages, collate_encoded
from q2l.data.seeding import SampleKey
from q2l.utils.threads import cap_workers


class EpochSampler(Sampler[int | SampleKey]):
    """Indices of one epoch: a permutation seeded by (seed, epoch), this rank's share of it.

    Args:
        num_samples: dataset length.
        shuffle: permute (training) or keep order (evaluation).
        seed: base seed; the permutation of epoch e uses seed + e.
        rank, world_size: this process's shard (every world_size-th index, from rank).
        drop_last: drop the tail so every rank gets the same count (training); otherwise ranks
            may differ by one sample (evaluation, where no sample may be repeated).
        sample_keys: yield SampleKey(index, seed, epoch) instead of index, for datasets that seed
            their augmentation per sample (MultiLabelImageDataset).
    """

    def __init__(
        self,
        num_samples: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        sample_keys: bool = False,
    ) -> None:
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.sample_keys = sample_keys
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip the first `start` samples of its order, counted over all ranks
        (mid-epoch resume; it also holds when the run resumes with another number of ranks)."""
        self.epoch = epoch
        self.start = start

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        order = order[self.start :]
        if self.drop_last:
            order = order[: len(order) - len(order) % self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int | SampleKey]:
        indices = self._indices()
        if self.sample_keys:
            return iter([SampleKey(index, self.seed, self.epoch) for index in indices])
        return iter(indices)

    def __len__(self) -> int:
        return len(self._indices())


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader over an `EpochSampler`; training drops the last partial batch.

    Training batches of a MultiLabelImageDataset are augmented with randomness seeded per
    (seed, epoch, sample index), so the batches do not depend on the number of workers: it is
    capped at the CPUs this process may use (more workers than CPUs only queue for them). Workers
    persist across epochs; memory is pinned for CUDA copies.
    """
    num_workers = cap_workers(num_workers)
    sampler = EpochSampler(
        len(dataset),
        shuffle=train,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_last=train,
        sample_keys=train and isinstance(dataset, MultiLabelImageDataset),
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=train,
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals,
        collate_fn=collate_encoded if isinstance(dataset, EncodedImages) else None,
        # The loader draws a base seed per epoch; from its own generator, not the global one the
        # model's dropout and MixUp use, so those do not depend on how the data is loaded.
        generator=torch.Generator().manual_seed(seed),
    )


def ignore_stop_signals(worker_id: int) -> None:
    """In a DataLoader worker: leave SIGTERM/SIGINT/SIGUSR1/SIGUSR2 to the main process.

    A scheduler signals the whole process group. PyTorch's workers die on SIGTERM (and SIGUSR1 by
    default), which would end the main process with "DataLoader worker killed" before it could
    save; ignoring them here lets the main process finish its step, checkpoint and shut the
    workers down itself.
    """
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(number, signal.SIG_IGN)
