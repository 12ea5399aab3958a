"""q2l.utils.threads: usable CPUs from faked affinity and cgroup quotas, the thread plan, the
governor."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.types import RunMode

from q2l.data.loader import build_loader
from q2l.training.preemption import StopRequest
from q2l.utils import threads
from q2l.utils.threads import ContentionGovernor, CpuBudget, cgroup_quota, plan_threads


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def no_user_threads(monkeypatch):
    """No OMP_NUM_THREADS / MKL_NUM_THREADS, and torch at what q2l saw at import."""
    for variable in threads.EXPLICIT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(threads, "_TORCH_DEFAULT_THREADS", torch.get_num_threads())
    monkeypatch.setattr(threads, "_applied", None)
    monkeypatch.setattr(threads, "_governor", None)


def test_cgroup_v2_quota_is_the_tightest_of_the_cgroup_and_its_parents(tmp_path):
    _write(tmp_path / "proc_cgroup", "0::/user.slice/job\n")
    _write(tmp_path / "cg/user.slice/job/cpu.max", "max 100000\n")
    _write(tmp_path / "cg/user.slice/cpu.max", "250000 100000\n")
    _write(tmp_path / "cg/cpu.max", "400000 100000\n")
    assert cgroup_quota(tmp_path / "cg", tmp_path / "proc_cgroup") == 2.5


def test_cgroup_v1_quota_reads_cfs_quota_and_period(tmp_path):
    _write(tmp_path / "proc_cgroup", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n")
    folder = tmp_path / "cg/cpu,cpuacct/docker/abc"
    _write(folder / "cpu.cfs_quota_us", "150000\n")
    _write(folder / "cpu.cfs_period_us", "100000\n")
    _write(tmp_path / "cg/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")  # the root: unlimited
    _write(tmp_path / "cg/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert cgroup_quota(tmp_path / "cg", tmp_path / "proc_cgroup") == 1.5


def test_no_quota_or_no_cgroup_files_means_unlimited(tmp_path):
    _write(tmp_path / "proc_cgroup", "0::/a\n")
    _write(tmp_path / "cg/a/cpu.max", "max 100000\n")
    assert cgroup_quota(tmp_path / "cg", tmp_path / "proc_cgroup") is None
    assert cgroup_quota(tmp_path / "missing", tmp_path / "missing_cgroup") is None


def test_cpu_budget_reads_the_affinity_mask(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    budget = threads.cpu_budget(tmp_path, tmp_path / "no_cgroup_file")
    assert budget == CpuBudget(affinity=3, quota=None)


@pytest.mark.parametrize(
    ("affinity", "quota", "usable"), [(8, None, 8), (8, 2.5, 2), (2, 6.0, 2), (4, 0.5, 1)]
)
def test_usable_cpus_are_whole_cpus_within_affinity_and_quota(affinity, quota, usable):
    assert CpuBudget(affinity, quota).usable == usable


@pytest.mark.parametrize(
    ("usable", "workers", "expected"),
    [(16, 8, (8, 8)), (2, 8, (1, 2)), (2, 0, (2, 0)), (4, 1, (3, 1)), (1, 4, (1, 1))],
)
def test_workers_never_exceed_the_usable_cpus_and_threads_get_the_rest(
    usable, workers, expected, no_user_threads
):
    plan = plan_threads(workers, CpuBudget(usable), environ={})
    assert (plan.intra_op, plan.workers) == expected
    assert plan.automatic and plan.usable == usable


@pytest.mark.parametrize("variable", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_the_users_thread_variable_wins(variable, no_user_threads):
    plan = plan_threads(4, CpuBudget(2), environ={variable: "3"})
    assert plan.source == variable and not plan.automatic
    assert plan.intra_op == torch.get_num_threads()
    assert plan.workers == 2  # workers are still capped


def test_a_torch_set_num_threads_call_before_q2l_wins(monkeypatch, no_user_threads):
    monkeypatch.setattr(threads, "_TORCH_DEFAULT_THREADS", torch.get_num_threads() + 1)
    assert plan_threads(0, CpuBudget(8), environ={}).source == "torch.set_num_threads"


def test_configure_threads_sets_torch_only_when_automatic(monkeypatch, no_user_threads):
    calls = []
    monkeypatch.setattr(threads, "_apply", calls.append)
    monkeypatch.setattr(threads, "cpu_budget", lambda: CpuBudget(3))
    assert threads.configure_threads(1, adapt=False).intra_op == 2
    assert calls == [2] and threads._governor is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads.configure_threads(1)
    assert calls == [2] and threads._governor is None


def test_q2ls_own_earlier_choice_is_not_taken_for_the_users(monkeypatch, no_user_threads):
    """A sweep's jobs run one after another in one process: each plans afresh."""
    monkeypatch.setattr(threads, "cpu_budget", lambda: CpuBudget(4))
    saved = torch.get_num_threads()
    try:
        assert threads.configure_threads(1, adapt=False).intra_op == 3
        assert threads.configure_threads(2, adapt=False).intra_op == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_the_train_command_chooses_threads_and_malloc_before_the_run(
    tiny_cfg, tmp_path, monkeypatch
):
    from q2l.cli import train as train_command

    calls = []
    monkeypatch.setattr(
        train_command,
        "configure_threads",
        lambda *args, **kwargs: calls.append(("threads", args, kwargs)),
    )
    monkeypatch.setattr(
        train_command, "configure_malloc", lambda **kwargs: calls.append(("malloc", kwargs))
    )
    summary = {"status": "completed", "best": {"value": 0.5}}
    monkeypatch.setattr(
        train_command, "run_command", lambda *a, **k: calls.append("run") or summary
    )
    job = SimpleNamespace(runtime=SimpleNamespace(output_dir=str(tmp_path)), mode=RunMode.RUN)
    monkeypatch.setattr(train_command.HydraConfig, "get", staticmethod(lambda: job))
    monkeypatch.setattr(train_command, "_STOP", StopRequest())  # no signal handlers installed
    cfg = tiny_cfg("dataset.num_workers=3", "trainer.deterministic=true")
    assert train_command._hydra_main(cfg) == 0.5  # hydra.main's entry run on a composed config
    assert calls == [
        ("threads", (3,), {"adapt": False}),  # deterministic: no governor changing threads
        ("malloc", {"keep_freed": True}),
        "run",
    ]


def test_build_loader_caps_its_workers_at_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(threads, "cpu_budget", lambda: CpuBudget(2, 1.0))
    loader = build_loader(list(range(8)), batch_size=4, train=False, num_workers=8)
    assert loader.num_workers == 1


class _FakeCpus:
    """/proc/stat and /proc/self/stat readings driven by the test: ticks per 2 CPUs."""

    def __init__(self) -> None:
        self.now, self.busy, self.total, self.own = 0.0, 0, 0, 0

    def advance(self, seconds: float, others_cpus: float, own_cpus: float = 1.0) -> None:
        ticks = int(seconds * 100)
        self.now += seconds
        self.total += 2 * ticks
        self.busy += int((others_cpus + own_cpus) * ticks)
        self.own += int(own_cpus * ticks)

    def governor(self, ceiling: int = 2) -> tuple[ContentionGovernor, list[int]]:
        calls: list[int] = []
        governor = ContentionGovernor(
            ceiling,
            frozenset({0, 1}),
            interval_s=2.0,
            read_cpus=lambda: (self.busy, self.total),
            read_self=lambda: self.own,
            clock=lambda: self.now,
            set_threads=calls.append,
        )
        return governor, calls


def test_the_governor_gives_back_threads_while_a_neighbour_is_busy_and_takes_them_again():
    cpus = _FakeCpus()
    governor, calls = cpus.governor()
    cpus.advance(2.0, others_cpus=1.0)  # one CPU's worth of another process
    governor.poll()
    assert governor.threads == 1 and calls == [1]
    cpus.advance(2.0, others_cpus=0.05)  # quiet again: background noise only
    governor.poll()
    assert governor.threads == 2 and calls == [1, 2]


def test_the_governor_looks_once_per_interval_and_never_goes_below_one_thread():
    cpus = _FakeCpus()
    governor, calls = cpus.governor()
    cpus.advance(1.0, others_cpus=2.0)
    governor.poll()  # too early: nothing read, nothing changed
    assert calls == []
    cpus.advance(1.5, others_cpus=2.0)
    governor.poll()
    assert calls == [1]


def test_the_governor_never_exceeds_the_plans_threads():
    cpus = _FakeCpus()
    governor, calls = cpus.governor(ceiling=1)
    cpus.advance(3.0, others_cpus=0.0)
    governor.poll()
    assert governor.threads == 1 and calls == []


def test_proc_stat_parsing_counts_only_the_processs_cpus_and_steal_as_busy(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  999 0 0 999 0 0 0 0 0 0\n"
        "cpu0 10 1 4 80 5 0 0 0 0 0\n"
        "cpu1 20 0 0 50 0 0 0 30 0 0\n"
        "cpu2 1000 0 0 0 0 0 0 0 0 0\n"
        "intr 123\n"
    )
    assert threads._read_cpu_times(frozenset({0, 1}), stat) == (15 + 50, 100 + 100)
    own = tmp_path / "self_stat"
    own.write_text("42 (python (q2l) x) R 1 2 3 4 5 6 7 8 9 10 111 22 0 0\n")
    assert threads._read_own_ticks(own) == 133
