"""A busy neighbour: `make train` beside another process's 2-thread matmul loop, against quiet.

On a shared machine another process may keep the CPUs busy at any time. A training process that
runs as many OpenMP threads as the machine has CPUs then waits, in every parallel region, for the
thread that is not running: the demo once took 23 minutes instead of 2 on a machine loaded by other
users. q2l.utils.threads sizes the thread pool from the usable CPUs and, in the CLI, gives threads
back while other processes keep the CPUs busy (ContentionGovernor).

Section i measures both ends:
- `make train` (the demo, from nothing, as section f runs it) quiet, then beside the neighbour:
  the wall-time ratio, target within 2x. The neighbour runs in a session of its own, as another
  user's job would (the kernel's autogroup then shares the CPUs between the sessions).
- the demo's training step beside the neighbour, in this process and in interleaved rounds: with
  the governor against PyTorch's fixed thread count (one per CPU), which is what the CLI ran
  before the governor.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import torch

from benchmarks import timing
from benchmarks.memory import DEMO_MAP_TARGET, run_training
from benchmarks.throughput import CASES, build_sides
from benchmarks.timing import Row, Workload, compare, interleaved
from q2l.training.engine import train_one_epoch
from q2l.utils.threads import ContentionGovernor, affinity_cpus, cpu_budget

NEIGHBOUR_THREADS = 2
WITHIN = 2.0  # `make train` beside the neighbour takes at most this many times its quiet time
# The neighbour: a matmul loop on NEIGHBOUR_THREADS OpenMP threads, for as long as it is needed.
_NEIGHBOUR_CODE = (
    "import torch\n"
    f"torch.set_num_threads({NEIGHBOUR_THREADS})\n"
    "a = torch.randn(1024, 1024)\n"
    "while True:\n"
    "    a @ a\n"
)


@contextlib.contextmanager
def busy_neighbour(threads: int = NEIGHBOUR_THREADS) -> Iterator[subprocess.Popen]:
    """Another process in its own session, keeping `threads` CPUs busy until the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-c", _NEIGHBOUR_CODE],
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(2.0)  # imported torch and spinning
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


def measure_contention(rounds: int, steps: int = 16) -> list[Row]:
    """Section i: `make train` quiet and beside the neighbour; the governed training step."""
    rows = _step_rows(rounds, steps)
    load_quiet = os.getloadavg()[0]
    quiet = run_training([], threads=None)
    with busy_neighbour():
        load_busy = os.getloadavg()[0]
        busy = run_training([], threads=None)
    best = float(busy.summary.get("best", {}).get("mAP", float("nan")))
    rows.append(
        Row(
            "i. contention",
            f"make train beside a {NEIGHBOUR_THREADS}-thread matmul loop vs quiet: wall time",
            busy.wall_time_s,
            quiet.wall_time_s,
            "s",
            "the same run without the neighbour",
            target=1.0 / WITHIN,
            lower_is_better=True,
            note=(
                f"target: within {WITHIN:g}x; best val mAP beside the neighbour {best:.2f} "
                f"(target {DEMO_MAP_TARGET:g}); the CLI's own thread choice (no OMP_NUM_THREADS); "
                f"1-min load average at the starts {load_quiet:.1f} (quiet) and {load_busy:.1f}"
            ),
        )
    )
    return rows


def _step_rows(rounds: int, steps: int) -> list[Row]:
    """The demo step beside the neighbour: the governor against one thread per usable CPU."""
    usable = cpu_budget().usable
    saved = torch.get_num_threads()
    with build_sides(CASES["demo"], steps) as sides, busy_neighbour():
        state, options, batches = sides.state, sides.options, sides.batches
        governor = ContentionGovernor(usable, affinity_cpus(), interval_s=0.5)

        def governed() -> int:
            for batch in batches:  # the engine polls the CLI's governor between steps
                train_one_epoch(state, [batch], options)
                governor.poll()
            return sum(images.shape[0] for images, _ in batches)

        def fixed() -> int:
            train_one_epoch(state, batches, options)
            return sum(images.shape[0] for images, _ in batches)

        workloads = {
            "governed": Workload(
                governed, lambda: torch.set_num_threads(governor.threads), keep_freed_memory=True
            ),
            "fixed": Workload(fixed, lambda: torch.set_num_threads(usable), keep_freed_memory=True),
        }
        quiet_wait, timing.QUIET_WAIT_S = timing.QUIET_WAIT_S, 0.0  # busy by design
        try:
            rates = interleaved(workloads, rounds)
        finally:
            timing.QUIET_WAIT_S = quiet_wait
            torch.set_num_threads(saved)
    return [
        compare(
            "i. contention",
            f"demo train step beside the neighbour: governed threads vs {usable} fixed",
            rates["governed"],
            rates["fixed"],
            "img/s",
            f"{usable} intra-op threads throughout",
            note=f"the governor's choice at the end: {governor.threads} thread(s)",
        )
    ]
