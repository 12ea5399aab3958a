"""q2l.utils.allocator: with freed memory kept, the allocations of a repeated step stop faulting
pages once the heap has settled; with glibc's defaults every step faults its large blocks anew."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from .conftest import run_python

# In a fresh process: a test worker's heap holds what earlier tests left, and glibc serves a large
# block from a free heap before it maps one, so there the default's faults depend on test order.
MEASURE = textwrap.dedent(
    """
    import json, resource
    import torch
    from q2l.utils.allocator import configure_malloc

    BLOCK = 16 * 2**20  # floats: 64 MiB, above glibc's largest mmap threshold

    def faults_of_steps(count):
        faults = []
        for _ in range(count):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.empty(BLOCK).fill_(1.0)  # one step: allocate, fill, free
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return faults

    default = faults_of_steps(4)
    kept = faults_of_steps(16) if configure_malloc(keep_freed=True) else None
    print(json.dumps({"default": default, "kept": kept, "pages": BLOCK * 4 // 4096}))
    """
)


@pytest.mark.slow
def test_keeping_freed_memory_ends_the_page_faults_of_reallocation():
    result = run_python(["-c", MEASURE], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    faults = json.loads(result.stdout.strip().splitlines()[-1])
    if faults["kept"] is None:
        pytest.skip("glibc only")
    pages = faults["pages"]
    assert all(count > pages // 2 for count in faults["default"]), faults  # mapped every step
    # The heap settles within a few steps (small allocations between two blocks can pin a freed
    # one, and the heap grows past it; measured: 6 steps fault, then none), as a training loop
    # settles in its first steps.
    assert all(count < pages // 100 for count in faults["kept"][-4:]), faults
