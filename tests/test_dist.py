"""q2l.utils.dist in a single process: rank 0 of a world of 1, where every collective is the
identity; the launcher variables it reads. Several processes: tests/test_distributed.py."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist

from q2l.utils import dist
from q2l.utils.errors import ConfigError

LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_STEP_NUM_TASKS",
    "SUBMITIT_LOCAL_NTASKS",
    "Q2L_DIST_TIMEOUT_MIN",
)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """A plain `python` process: no launcher variables, no process group."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not torch_dist.is_initialized()


def test_a_single_process_is_rank_0_of_a_world_of_1():
    assert (dist.rank(), dist.world_size()) == (0, 1)
    assert dist.is_main_process() and not dist.is_distributed()
    assert not dist.launched_by_torchrun() and not dist.launched_as_tasks()


def test_init_and_destroy_do_nothing_in_a_single_process():
    dist.init()
    assert not torch_dist.is_initialized()
    dist.destroy()


def test_before_the_process_group_ranks_come_from_the_launchers_variables(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (dist.rank(), dist.world_size()) == (1, 2)
    assert not dist.is_main_process() and dist.launched_by_torchrun()
    assert not dist.launched_as_tasks()  # torchrun set RANK: not SLURM's tasks


@pytest.mark.parametrize("variable", ["SLURM_STEP_NUM_TASKS", "SUBMITIT_LOCAL_NTASKS"])
def test_several_tasks_without_torchrun_are_launched_as_tasks(monkeypatch, variable):
    monkeypatch.setenv(variable, "2")
    assert dist.launched_as_tasks() and not dist.launched_by_torchrun()
    monkeypatch.setenv(variable, "1")
    assert not dist.launched_as_tasks()


def test_collectives_are_the_identity():
    value = {"a": [1, 2]}
    assert dist.broadcast(value) is value
    assert dist.any_rank(True) is True and dist.any_rank(False) is False
    assert dist.sum_over_ranks(2.5) == 2.5
    rows = torch.arange(6.0).reshape(3, 2)
    assert dist.gather_rows(rows) is rows
    assert dist.gather_objects(value) == [value]
    module = torch.nn.BatchNorm1d(2)
    module.running_mean.fill_(3.0)
    dist.broadcast_module_buffers(module)
    assert torch.equal(module.running_mean, torch.full((2,), 3.0))


def test_on_main_runs_the_function_once_and_returns_its_result():
    calls = []
    assert dist.on_main(lambda a, b: calls.append((a, b)) or a + b, 2, 3) == 5
    assert calls == [(2, 3)]


@pytest.mark.parametrize("error", [ValueError("refused"), KeyboardInterrupt()])
def test_on_main_raises_the_functions_own_error(error):
    def fail():
        raise error

    with pytest.raises(type(error)) as raised:
        dist.on_main(fail)
    assert raised.value is error


@pytest.fixture
def global_rng():
    """The process's random streams, restored after the test reseeds them."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def test_seeding_is_repeatable_and_offset_by_the_rank(monkeypatch, global_rng):
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    dist.seed_everything(7)
    first = draws()
    dist.seed_everything(7)
    assert draws() == first
    monkeypatch.setenv("RANK", "1")
    dist.seed_everything(7)
    on_rank_1 = draws()
    monkeypatch.delenv("RANK")
    dist.seed_everything(8)
    assert on_rank_1 == draws() != first  # rank 1 draws seed + 1's numbers


def test_only_other_ranks_are_quieted(monkeypatch):
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.INFO)
    try:
        dist.quiet_other_ranks()
        assert root.level == logging.INFO
        monkeypatch.setenv("RANK", "1")
        dist.quiet_other_ranks()
        assert root.level == logging.WARNING
    finally:
        root.setLevel(previous)  # setLevel, not setattr: it also clears the loggers' cache


def test_resolve_device_and_the_collective_timeout(monkeypatch):
    assert dist.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert dist.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="trainer.device='cuda' but CUDA is not available"):
            dist.resolve_device("cuda")
    assert dist.timeout_minutes() == 30
    monkeypatch.setenv("Q2L_DIST_TIMEOUT_MIN", "2.5")
    assert dist.timeout_minutes() == 2.5
