"""How many CPU threads a q2l process computes with: never more than the CPUs it may use.

PyTorch sizes its intra-op thread pool from the machine's cores. A process confined to fewer CPUs
(taskset, a container's CPU quota, a SLURM allocation) or sharing them with its own DataLoader
workers then runs more threads than it has CPUs, and every parallel region waits for a thread that
is not running: on a 2-CPU machine whose other processes kept it busy, the demo trained at 6 img/s
instead of 150. Here the usable CPUs are read from the affinity mask and the cgroup (v1 or v2) CPU
quota, DataLoader workers are capped at that count, and the intra-op threads get what the workers
leave. An explicit OMP_NUM_THREADS / MKL_NUM_THREADS, or a `torch.set_num_threads` call made before
q2l's, is the user's choice and is kept.

Neighbours change while a run trains, so the CLI also installs a `ContentionGovernor`: between
steps it gives back intra-op threads while other processes keep the CPUs busy, and takes them
again when they stop. On the same machine, loaded by other users' jobs, the demo's training step
ran at 2.6 img/s with 2 threads and 28 img/s with 1 (docs/performance.md).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EXPLICIT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# PyTorch's own choice, read when q2l first imports this module (before q2l changes anything),
# and the count q2l itself last set: any other count means the user called torch.set_num_threads.
_TORCH_DEFAULT_THREADS = torch.get_num_threads()
_applied: int | None = None


def _apply(threads: int) -> None:
    """torch.set_num_threads, remembered as q2l's own (a sweep's next job plans again)."""
    global _applied
    torch.set_num_threads(threads)
    _applied = threads


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may use.

    affinity: CPUs in its affinity mask (sched_getaffinity).
    quota: its cgroup CPU quota in CPUs (quota / period; the tightest of its cgroup and their
        parents), or None when unlimited.
    """

    affinity: int
    quota: float | None = None

    @property
    def usable(self) -> int:
        """Whole CPUs the process can keep busy at once: a quota of 1.5 CPUs is 1, never 0."""
        if self.quota is None:
            return self.affinity
        return max(1, min(self.affinity, math.floor(self.quota)))


@dataclass(frozen=True)
class ThreadPlan:
    """The decision: intra-op threads, DataLoader workers, and why.

    source: "auto" (chosen here), or the variable or call the user set the threads with.
    """

    intra_op: int
    workers: int
    usable: int
    source: str

    @property
    def automatic(self) -> bool:
        return self.source == "auto"


def cpu_budget(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")):
    """This process's CpuBudget, from its affinity mask and its cgroup's CPU quota."""
    return CpuBudget(len(affinity_cpus()), cgroup_quota(cgroup_root, proc_cgroup))


def cgroup_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The CPU quota (in CPUs) of the cgroup `proc_cgroup` names and of its parents, the tightest
    one; None when none is set or the files are not there.

    cgroup v2: `<root>/<path>/cpu.max` holds "max 100000" or "200000 100000" (quota period).
    cgroup v1: `<root>/cpu,cpuacct/<path>/cpu.cfs_quota_us` (-1: none) and `cpu.cfs_period_us`.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            quotas += _v2_quotas(cgroup_root, path)
        elif "cpu" in controllers.split(","):
            quotas += _v1_quotas(cgroup_root, controllers, path)
    return min(quotas, default=None)


def _ancestors(base: Path, path: str) -> list[Path]:
    """`base/path` and each parent folder up to `base`."""
    parts = [part for part in path.strip("/").split("/") if part]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_quotas(root: Path, path: str) -> list[float]:
    quotas = []
    for folder in _ancestors(root, path):
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and int(period) > 0:
            quotas.append(int(quota) / int(period))
    return quotas


def _v1_quotas(root: Path, controllers: str, path: str) -> list[float]:
    # The hierarchy is mounted under its controllers' names ("cpu,cpuacct"), often also as "cpu".
    mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
    base = next((mount for mount in mounts if mount.is_dir()), None)
    if base is None:
        return []
    quotas = []
    for folder in _ancestors(base, path):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            quotas.append(quota / period)
    return quotas


def plan_threads(
    num_workers: int, budget: CpuBudget | None = None, environ: dict[str, str] | None = None
) -> ThreadPlan:
    """Intra-op threads and DataLoader workers for a process with `budget`'s CPUs.

    Workers: `num_workers`, at most the usable CPUs. Intra-op threads: the usable CPUs the workers
    leave, at least 1; unless the user chose them (EXPLICIT_VARIABLES in `environ`, or a
    torch.set_num_threads call before this one), which is kept.
    """
    budget = budget or cpu_budget()
    environ = os.environ if environ is None else environ
    usable = budget.usable
    workers = min(num_workers, usable)
    for variable in EXPLICIT_VARIABLES:
        if environ.get(variable, "").strip().isdigit() and int(environ[variable]) > 0:
            return ThreadPlan(torch.get_num_threads(), workers, usable, variable)
    if torch.get_num_threads() not in (_TORCH_DEFAULT_THREADS, _applied):
        return ThreadPlan(torch.get_num_threads(), workers, usable, "torch.set_num_threads")
    return ThreadPlan(max(1, usable - workers), workers, usable, "auto")


def cap_workers(num_workers: int) -> int:
    """`num_workers` DataLoader workers, at most the CPUs this process may use."""
    return min(num_workers, cpu_budget().usable)


def configure_threads(num_workers: int, adapt: bool = True) -> ThreadPlan:
    """Apply `plan_threads` to this process (torch.set_num_threads), log the decision and, with
    `adapt` and threads chosen here, install the ContentionGovernor `rebalance_threads` polls."""
    global _governor
    plan = plan_threads(num_workers)
    _governor = None
    if plan.automatic:
        _apply(plan.intra_op)
        if adapt and _read_cpu_times(affinity_cpus()) is not None:
            _governor = ContentionGovernor(plan.intra_op, affinity_cpus())
    log.info(
        "CPU threads: %d intra-op (%s), %d DataLoader worker(s), %d usable CPU(s)",
        plan.intra_op,
        "from the usable CPUs less the workers" if plan.automatic else f"set by {plan.source}",
        plan.workers,
        plan.usable,
    )
    return plan


def rebalance_threads() -> None:
    """Between steps: let this process's ContentionGovernor (if the CLI installed one) adjust the
    intra-op threads. Cheap: it looks at the CPUs at most once per interval."""
    if _governor is not None:
        _governor.poll()


_governor: ContentionGovernor | None = None


class ContentionGovernor:
    """Keeps the intra-op threads at what other processes leave of this process's CPUs.

    A parallel region ends when its slowest thread does; a thread that waits for a CPU another
    process holds stalls the region, and OpenMP's spinning threads burn the time it needs. So
    every `interval_s`, `poll` reads how many of `cpus` other processes kept busy since its last
    look (the CPUs' busy time, /proc/stat, less this process's own, /proc/self/stat; hypervisor
    steal counts as busy) and sets torch's intra-op threads to the CPUs left: at most `ceiling`
    (the ThreadPlan's), at least 1. This process's DataLoader workers count as other processes.

    Args:
        read_cpus: () -> (busy, total) clock ticks of `cpus` since boot, or None.
        read_self: () -> clock ticks this process has run since it started.
    """

    def __init__(
        self,
        ceiling: int,
        cpus: frozenset[int],
        interval_s: float = 2.0,
        read_cpus: Callable[[], tuple[int, int] | None] | None = None,
        read_self: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        set_threads: Callable[[int], None] = _apply,
    ) -> None:
        self.ceiling = ceiling
        self.cpus = cpus
        self.interval_s = interval_s
        self._read_cpus = read_cpus or (lambda: _read_cpu_times(cpus))
        self._read_self = read_self or _read_own_ticks
        self._clock = clock
        self._set_threads = set_threads
        self.threads = ceiling
        self.changes = 0
        self._last = (clock(), self._read_cpus(), self._read_self())

    def poll(self) -> None:
        """Adjust the threads if `interval_s` has passed since the last look."""
        now = self._clock()
        if now - self._last[0] < self.interval_s:
            return
        cpu_times, own = self._read_cpus(), self._read_self()
        _, last_cpus, last_own = self._last
        self._last = (now, cpu_times, own)
        if cpu_times is None or last_cpus is None or cpu_times[1] <= last_cpus[1]:
            return
        busy, total = cpu_times[0] - last_cpus[0], cpu_times[1] - last_cpus[1]
        others = max(busy - (own - last_own), 0) * len(self.cpus) / total  # in CPUs
        self._set(self.threads_for(others))

    def threads_for(self, others: float) -> int:
        """Intra-op threads when other processes keep `others` CPUs busy (a share up to
        _IDLE_SHARE of a CPU is background noise, not a neighbour)."""
        taken = max(math.ceil(others - _IDLE_SHARE), 0)
        return max(1, min(self.ceiling, len(self.cpus) - taken))

    def _set(self, threads: int) -> None:
        if threads == self.threads:
            return
        # The first change is news (a neighbour appeared); later ones are routine.
        level = logging.INFO if self.changes == 0 else logging.DEBUG
        log.log(
            level,
            "CPU contention: other processes keep this process's CPUs busy; intra-op threads "
            "%d -> %d%s",
            self.threads,
            threads,
            " (later changes are logged at DEBUG)" if self.changes == 0 else "",
        )
        self._set_threads(threads)
        self.threads = threads
        self.changes += 1


_IDLE_SHARE = 0.25


def affinity_cpus() -> frozenset[int]:
    """The CPUs this process may run on (all of them where the OS does not say)."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


def _read_cpu_times(cpus: frozenset[int], stat: Path = Path("/proc/stat")):
    """(busy, total) clock ticks of `cpus` since boot, from /proc/stat; None without it."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *values = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        ticks = [int(value) for value in values[:8]]
        busy += sum(ticks) - ticks[3] - ticks[4]
        total += sum(ticks)
    return (busy, total) if total else None


def _read_own_ticks(stat: Path = Path("/proc/self/stat")) -> int:
    """utime + stime of this process (all its threads), in clock ticks; 0 without /proc."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), after pid and comm
