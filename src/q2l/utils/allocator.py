"""glibc malloc for training on CPU: memory a step frees stays in the heap for the next step.

PyTorch's CPU tensors come from malloc. glibc maps blocks above its mmap threshold (128 KiB,
rising to at most 32 MiB) straight from the kernel and unmaps them when they are freed, so every
training step faults its activations, autocast's bf16 weight copies and its gradients back in,
each page zeroed by the kernel: 305,000 page faults (1.2 GB) per step of the paper model (R50 and
a 150 M-parameter head), measured with 2 threads. With mmap off and the heap never trimmed, the
next steps reuse the freed blocks and, once the heap has settled (a few steps), fault nothing
(docs/performance.md has the step times).
The price: the process keeps its peak heap, which a training loop reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_NEVER = 2**31 - 1  # mallopt takes an int
_GLIBC_MAX_MMAP_THRESHOLD = 32 * 2**20  # on 64-bit; where glibc's own threshold settles


def configure_malloc(keep_freed: bool = True) -> bool:
    """Set glibc's malloc for this process; returns False (nothing changed) on other C libraries.

    keep_freed=True: no block is mmapped and the heap is never trimmed, so freed memory is reused.
    keep_freed=False: glibc's behaviour in a long-running process: blocks of 32 MiB and more
        mmapped and unmapped on free, the heap trimmed above 64 MiB free, and what the heap holds
        free now returned (the benchmark runs its baselines this way, as they would run in a
        process of their own). Not quite a fresh process: malloc serves a block from free heap
        memory before it maps one, so a heap that grew under keep_freed=True soon faults no more
        either (measured with a 64 MiB block: two steps fault, then none). A baseline timed after
        q2l's side is favoured by this, if anything.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    if keep_freed:
        settings = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: _NEVER}
    else:
        settings = {
            _M_MMAP_MAX: 65536,
            _M_MMAP_THRESHOLD: _GLIBC_MAX_MMAP_THRESHOLD,
            _M_TRIM_THRESHOLD: 2 * _GLIBC_MAX_MMAP_THRESHOLD,
        }
    applied = all(mallopt(option, value) == 1 for option, value in settings.items())
    if not keep_freed:
        malloc_trim(0)
    log.debug("malloc keeps freed memory: %s (applied: %s)", keep_freed, applied)
    return applied
