"""Timing that survives a shared machine: interleaved rounds, paired per-round ratios, one table
row per comparison, and the machine's own matmul peak.

Every figure the benchmark reports is a ratio of two rates measured in the same process, in the
same rounds: each round runs every workload once, in an order that rotates from round to round,
so a burst of load from another process slows neighbours alike instead of one side. A row's
ratio is the median of the per-round ratios (each round pairs the two sides run moments apart),
and its spread is their minimum and maximum.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from q2l.utils.allocator import configure_malloc
from q2l.utils.amp import resolve_precision


@dataclass
class Workload:
    """Something to time: `run()` does the work once and returns how many items it processed.

    `prepare()` runs untimed before each `run()`: switching a shared model's memory format or an
    optimizer's implementation between workloads is not part of what is measured.
    keep_freed_memory: the malloc setting the workload runs under
        (q2l.utils.allocator.configure_malloc): True for q2l's side, as `python train.py` sets
        it; False, glibc's own behaviour, for the baselines, as they would run in a process of
        their own.
    """

    run: Callable[[], int]
    prepare: Callable[[], None] = lambda: None
    keep_freed_memory: bool = False


@dataclass
class Rates:
    """Items per second of one workload, one entry per timed round."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return max(self.samples)

    @property
    def worst(self) -> float:
        return min(self.samples)


# Before each round, wait up to QUIET_WAIT_S for other processes to go quiet, until the run has
# spent QUIET_BUDGET_S waiting in all (a machine that stays busy then gets measured as it is).
QUIET_WAIT_S = 10.0
QUIET_BUDGET_S = 60.0
_QUIET_CORES = 0.3  # other processes' use of the cores the benchmark needs that counts as quiet
quiet_stats = {"rounds": 0, "rounds_started_busy": 0, "seconds_waited": 0.0}


def interleaved(workloads: dict[str, Workload], rounds: int, warmup: int = 1) -> dict[str, Rates]:
    """Items per second of each workload in each of `rounds` interleaved rounds.

    `warmup` untimed rounds come first (allocator, oneDNN kernel selection, lazy init). Before each
    timed round, waits up to QUIET_WAIT_S for other processes to leave the CPUs alone.
    """
    names = list(workloads)
    for _ in range(warmup):
        for name in names:
            _prepare(workloads[name])
            workloads[name].run()
    rates = {name: Rates([]) for name in names}
    for index in range(max(rounds, 1)):
        _quiet_round()
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            _prepare(workloads[name])
            start = time.perf_counter()
            items = workloads[name].run()
            rates[name].samples.append(items / (time.perf_counter() - start))
    return rates


def _prepare(workload: Workload) -> None:
    configure_malloc(keep_freed=workload.keep_freed_memory)
    workload.prepare()


def _quiet_round() -> None:
    """Wait for quiet within the budget; count the rounds that start busy anyway."""
    if QUIET_WAIT_S <= 0:
        return
    budget = max(min(QUIET_WAIT_S, QUIET_BUDGET_S - quiet_stats["seconds_waited"]), 0.0)
    start = time.monotonic()
    quiet = wait_for_quiet(budget)
    quiet_stats["seconds_waited"] += time.monotonic() - start
    quiet_stats["rounds"] += 1
    quiet_stats["rounds_started_busy"] += int(not quiet)


def wait_for_quiet(max_wait_s: float, sample_s: float = 0.25) -> bool:
    """Sleep until other processes leave this process's cores (one per intra-op thread) nearly
    idle, for at most `max_wait_s` (this process sleeps meanwhile, so any use is someone else's).
    Returns whether it got quiet (True without /proc/stat); with no time left, samples once."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = _busy_cores(sample_s)
        # Quiet: other processes leave as many cores free as PyTorch has intra-op threads.
        spare = (os.cpu_count() or 1) - torch.get_num_threads()
        if busy is None or busy <= spare + _QUIET_CORES:
            return True
        if time.monotonic() >= deadline:
            return False


def _busy_cores(sample_s: float) -> float | None:
    """CPU cores in use over the next `sample_s` seconds, from /proc/stat; None without it."""

    def read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(value) for value in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, sum(fields)

    before = read()
    time.sleep(sample_s)
    after = read()
    if before is None or after is None or after[1] == before[1]:
        return None
    cores = os.cpu_count() or 1
    return (after[0] - before[0]) / (after[1] - before[1]) * cores


@dataclass
class Row:
    """One line of the report: q2l's figure against a baseline measured in the same run.

    A ratio above 1 always means q2l is ahead: value / baseline for rates, baseline / value with
    `lower_is_better`. Rows from interleaved rounds (`compare`) carry the median of the per-round
    ratios and their spread (`ratio_low`, `ratio_high`); other rows compute the ratio of the two
    figures. target: the ratio asked for, or None; met when the median ratio reaches it.
    """

    section: str
    name: str
    value: float
    baseline: float | None
    unit: str
    baseline_name: str = ""
    target: float | None = None
    lower_is_better: bool = False
    note: str = ""
    round_ratios: list[float] = field(default_factory=list)
    ratio: float | None = field(init=False)

    def __post_init__(self) -> None:
        if self.round_ratios:
            self.ratio = statistics.median(self.round_ratios)
        elif self.baseline and self.value:
            self.ratio = (
                self.baseline / self.value if self.lower_is_better else self.value / self.baseline
            )
        else:
            self.ratio = None

    @property
    def ratio_low(self) -> float | None:
        return min(self.round_ratios, default=None)

    @property
    def ratio_high(self) -> float | None:
        return max(self.round_ratios, default=None)

    @property
    def passed(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target

    def as_dict(self) -> dict:
        derived = {
            "ratio_low": self.ratio_low,
            "ratio_high": self.ratio_high,
            "passed": self.passed,
        }
        return {**asdict(self), **derived}


def compare(
    section: str,
    name: str,
    q2l: Rates,
    baseline: Rates,
    unit: str,
    baseline_name: str = "",
    seconds: bool = False,
    **row: object,
) -> Row:
    """A row from two workloads' interleaved rates: their median rates, and the ratio of each
    round (median and spread in the table). `seconds`: seconds per item (1 / rate), lower is
    better."""
    value, reference = q2l.median, baseline.median
    if seconds:
        value, reference = 1.0 / value, 1.0 / reference
    return Row(
        section,
        name,
        value,
        reference,
        unit,
        baseline_name,
        lower_is_better=seconds,
        round_ratios=[a / b for a, b in zip(q2l.samples, baseline.samples, strict=True)],
        **row,
    )


def matmul_peak(dtype: torch.dtype, size: int = 2048, rounds: int = 20) -> float:
    """Best FLOP/s of a (size × size) @ (size × size) matmul in `dtype`: the practical peak.

    Many short runs, so that one of them finds the CPUs free on a shared machine.
    """
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up: thread pool, oneDNN/MKL kernel selection
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def machine() -> dict:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx512_bf16": _cpu_check("_is_avx512_bf16_supported"),
        "amx": _cpu_check("_is_amx_tile_supported"),
        "precision_auto": resolve_precision("auto", torch.device("cpu")),
        "cuda": torch.cuda.is_available(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _cpu_check(name: str) -> bool:
    return bool(getattr(torch.cpu, name, lambda: False)())


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
