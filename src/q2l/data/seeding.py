"""Augmentation randomness per sample: a function of (seed, epoch, index), not of the worker.

DataLoader workers each carry their own random state, so which worker draws which sample (which
changes with num_workers) would otherwise change the augmentations. Instead the training sampler
hands the dataset a `SampleKey` (index, seed, epoch) and the dataset reseeds Python's, NumPy's and
torch's CPU generators from it before decoding and transforming that sample: the same run gives the
same augmented tensors with 0, 2 or 16 workers, and after a mid-epoch resume.

Reseeding is cheap (a few microseconds): the global generators are reseeded, not forked. In a
worker nothing else uses them between samples. In the main process (num_workers=0) their state is
saved and restored around the sample, so the model's own randomness (dropout, MixUp) does not
depend on how the data was loaded.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info


class SampleKey(NamedTuple):
    """What the training sampler yields instead of a bare index."""

    index: int
    seed: int
    epoch: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed mixing (seed, epoch, index) so neighbouring samples get unrelated streams."""
    sequence = np.random.SeedSequence([seed % 2**64, epoch, index])
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


@contextlib.contextmanager
def seeded_sample(key: SampleKey) -> Iterator[None]:
    """Seed `random`, `numpy.random` and torch's CPU generator from `key` for one sample."""
    in_main_process = get_worker_info() is None
    if in_main_process:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    value = sample_seed(key.seed, key.epoch, key.index)
    random.seed(value)
    np.random.seed(value % 2**32)
    # The CPU generator only: torch.manual_seed would also reseed every CUDA generator.
    torch.default_generator.manual_seed(value)
    try:
        yield
    finally:
        if in_main_process:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
