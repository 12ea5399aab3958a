"""q2l.utils.allocator: with freed memory kept, a step's second allocation of a block faults no
pages."""

from __future__ import annotations

import resource

import pytest
import torch

from q2l.utils.allocator import configure_malloc

BLOCK = 16 * 2**20  # floats: 64 MiB, above glibc's largest mmap threshold


def _faults_of_a_fresh_block() -> int:
    torch.empty(BLOCK).fill_(1.0)  # allocated and freed once: glibc has seen the size
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(BLOCK).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_keeping_freed_memory_ends_the_page_faults_of_reallocation():
    if not configure_malloc(keep_freed=True):
        pytest.skip("glibc only")
    try:
        # The settings apply to what is freed from now on: a block freed before them (here, in
        # a fresh process, the first one) may have left the heap already.
        _faults_of_a_fresh_block()
        kept = _faults_of_a_fresh_block()
        configure_malloc(keep_freed=False)
        returned = _faults_of_a_fresh_block()
    finally:
        configure_malloc(keep_freed=False)
    pages = BLOCK * 4 // 4096
    assert kept < pages // 100, kept  # reused: (nearly) no faults
    assert returned > pages // 2, returned  # mapped afresh: a fault per page
