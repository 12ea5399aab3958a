"""DDP on CPU (gloo) under torchrun: one run, exact evaluation, collective failure, exact resume.

Each CLI test starts 2 processes on the tiny digits data (64 train images at 32 px, 33 val: an
odd count, so the two evaluation shards differ in size).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from q2l.data.loader import EpochSampler
from q2l.training.checkpoint import load_checkpoint

from .conftest import REPO_ROOT, run_python, tiny_overrides, wait_for

TRAIN = str(REPO_ROOT / "train.py")
FAULTY = str(REPO_ROOT / "tests" / "helpers" / "faulty_train.py")
EXACT = ("trainer.deterministic=true", "dataset.batch_size=8", "trainer.epochs=2")


@pytest.fixture(scope="module")
def odd_digits(tmp_path_factory) -> Path:
    from q2l.demo.digits import build_digits_coco

    root = tmp_path_factory.mktemp("odd") / "digits"
    return build_digits_coco(root, num_train=64, num_val=33, canvas_size=32, seed=0)


def _overrides(root: Path, cache: Path, *extra: str) -> list[str]:
    base = [o for o in tiny_overrides(root, cache) if not o.startswith("prepare.data.num_val")]
    return [*base, "prepare.data.num_val=33", *EXACT, *extra]


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _torchrun(script: str, overrides: list[str], cwd: Path, env: dict, timeout: int = 300):
    return run_python([*TORCHRUN, script, *overrides], env, timeout, cwd=cwd)


@pytest.fixture
def env(tmp_path) -> dict:
    return {
        **os.environ,
        "Q2L_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "Q2L_DIST_TIMEOUT_MIN": "2",
    }


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, odd_digits):
    """A 2-process run started without hydra.run.dir, as users type it; returns its directory."""
    base = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "Q2L_CACHE_DIR": str(base / "cache"), "OMP_NUM_THREADS": "1"}
    result = _torchrun(TRAIN, _overrides(odd_digits, base / "cache"), cwd=base, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = [p for p in (base / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs  # both ranks agreed on one directory
    return run_dirs[0], result


@pytest.mark.slow
def test_two_processes_make_one_run_that_single_process_eval_reproduces(
    two_process_run, tmp_path, env
):
    run_dir, result = two_process_run
    log = (run_dir / "train.log").read_text()
    assert "2 process(es), global batch 16 (8 per process x 1 accumulated)" in log
    assert result.stdout.count("epoch 2/2") == 1  # rank 1 logs warnings only
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(
        r["step"] == 4 * r["epoch"] for r in records
    )
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["world_size"] == 2 and len(last["rng"]) == 2
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # plain, unwrapped

    evaluated = run_python(["eval.py", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}"], env)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    [written] = (run_dir / "checkpoints").glob("eval-best-*/eval.json")
    result = json.loads(written.read_text())
    assert result["num_images"] == 33  # every val image once, none twice
    assert result["metrics"]["mAP"] == pytest.approx(checkpoint["metrics"]["mAP_best"], abs=1e-6)


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_before_the_step(odd_digits, tmp_path, env):
    run_dir = tmp_path / "run"
    env = {**env, "Q2L_TEST_FAULT": "nan:1:6", "Q2L_TEST_RECORD": str(tmp_path)}
    result = _torchrun(
        FAULTY,
        _overrides(odd_digits, tmp_path / "cache", f"hydra.run.dir={run_dir}"),
        cwd=REPO_ROOT,
        env=env,
    )
    assert result.returncode != 0
    assert "not finite at step 6" in result.stdout + result.stderr
    assert (tmp_path / "exit-0").read_text() == (tmp_path / "exit-1").read_text() == "1"
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 4  # nothing after step 5


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's epoch records, less what depends on time (images/s)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k != "train_images_per_sec"} for line in lines
    ]


@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_every_rank_then_resumes_bitwise(
    two_process_run, odd_digits, tmp_path, env
):
    run_dir = tmp_path / "run"
    env = {**env, "Q2L_TEST_RECORD": str(tmp_path)}
    command = [
        *TORCHRUN,
        FAULTY,
        *_overrides(
            odd_digits,
            tmp_path / "cache",
            f"hydra.run.dir={run_dir}",
            "trainer.slurm_requeue=false",
        ),
    ]
    process = subprocess.Popen(
        [sys.executable, *command],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(run_dir / "checkpoints" / "last.pt", tmp_path / "pid-1")
    os.kill(int((tmp_path / "pid-1").read_text()), signal.SIGTERM)  # rank 1 only
    process.communicate(timeout=120)
    assert (tmp_path / "exit-0").read_text() == (tmp_path / "exit-1").read_text() == "75"
    stopped = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert stopped["progress"]["status"] == "running" and stopped["step"] < 8

    resumed = run_python(command, {**env, "Q2L_TEST_RECORD": ""})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert final["step"] == 8
    uninterrupted, _ = two_process_run  # the same 2-process run, nothing happened to it
    reference = load_checkpoint(uninterrupted / "checkpoints" / "last.pt")
    for key, tensor in reference["model"].items():
        assert torch.equal(tensor, final["model"][key]), key
    # Issue 16, point 6: the records too (each rank's own partial loss sum was saved and restored).
    assert _records(run_dir) == _records(uninterrupted)


@pytest.mark.slow
def test_torchrun_stopped_by_a_group_sigterm_saves_requeues_and_exits_as_documented(
    odd_digits, tmp_path, env
):
    """Issue 16, point 5: SLURM (or `kill -- -PGID`) signals torchrun and every rank at once. The
    ranks save at one step and exit 75; rank 0 asks SLURM to requeue the job; torchrun itself
    then reports the signal and exits 1 (docs/distributed.md): the requeue does not depend on it."""
    run_dir = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol-calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {
        **env,
        "PATH": f"{bin_dir}:{env['PATH']}",
        "SLURM_JOB_ID": "4242",
        "Q2L_TEST_RECORD": str(tmp_path),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            *TORCHRUN,
            FAULTY,
            *_overrides(odd_digits, tmp_path / "cache", f"hydra.run.dir={run_dir}"),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for(run_dir / "checkpoints" / "last.pt", tmp_path / "pid-1", process=process)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-3000:]  # torchrun's own report of the signal
    assert "SignalException" in stderr
    assert (tmp_path / "exit-0").read_text() == (tmp_path / "exit-1").read_text() == "75"
    assert calls.read_text() == "requeue 4242\n"  # once, by rank 0
    stopped = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert stopped["progress"]["status"] == "running" and stopped["world_size"] == 2


@pytest.mark.slow
def test_a_stop_during_start_up_on_one_rank_stops_every_rank_with_75(odd_digits, tmp_path, env):
    """Issue 16, point 5: rank 1 gets SIGUSR1 while it builds its model; both ranks stop together
    at the next start-up milestone and exit 75, none left waiting in a collective."""
    run_dir = tmp_path / "run"
    result = _torchrun(
        FAULTY,
        _overrides(odd_digits, tmp_path / "cache", f"hydra.run.dir={run_dir}"),
        cwd=REPO_ROOT,
        env={**env, "Q2L_TEST_SIGNAL": "1:model:SIGUSR1", "Q2L_TEST_RECORD": str(tmp_path)},
    )
    assert (tmp_path / "exit-0").read_text() == (tmp_path / "exit-1").read_text() == "75"
    assert result.returncode != 0
    assert not (run_dir / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_a_rank_that_dies_takes_the_job_down(odd_digits, tmp_path, env):
    started = time.monotonic()
    result = _torchrun(
        FAULTY,
        _overrides(odd_digits, tmp_path / "cache", f"hydra.run.dir={tmp_path / 'run'}"),
        cwd=REPO_ROOT,
        env={**env, "Q2L_TEST_FAULT": "exit:1:3"},
        timeout=240,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 120  # no rank was left waiting in a collective


@pytest.mark.slow
def test_a_two_process_run_resumes_in_one_process(
    two_process_run, compose_config, odd_digits, tmp_path
):
    from q2l.training.run import train

    # A copy: the run stays the uninterrupted reference of the other tests. Checkpoints are only
    # ever replaced whole (atomic writes), so linking them is copying them.
    run_dir = shutil.copytree(
        two_process_run[0],
        tmp_path / "run",
        copy_function=lambda src, dst: (
            os.link(src, dst) if src.endswith(".pt") else shutil.copy2(src, dst)
        ),
    )
    cfg = compose_config(
        "train",
        _overrides(odd_digits, tmp_path / "cache", "trainer.epochs=3", "allow_config_change=true"),
    )
    summary = train(cfg, run_dir)
    assert summary["status"] == "completed" and summary["epochs_run"] == 3
    assert summary["steps"] == 8 + 8  # one process takes all 64 images: 8 steps of 8


def test_sampler_resumes_mid_epoch_with_any_number_of_ranks():
    def shard(world: int, rank: int, start: int) -> list[int]:
        sampler = EpochSampler(
            100, shuffle=True, seed=3, rank=rank, world_size=world, drop_last=True
        )
        sampler.set_epoch(2, start=start)
        return list(sampler)

    whole = shard(1, 0, 0)
    for world in (2, 3):
        first = [shard(world, r, 0)[:4] for r in range(world)]  # 4 samples per rank consumed
        rest = [shard(world, r, 4 * world) for r in range(world)]
        assert all(
            f + r == shard(world, k, 0) for k, (f, r) in enumerate(zip(first, rest, strict=True))
        )
    # Resumed on another world size: the samples left are exactly those not yet consumed.
    consumed = {i for r in range(2) for i in shard(2, r, 0)[:6]}
    remaining = {i for r in range(3) for i in shard(3, r, 12)}
    assert consumed.isdisjoint(remaining) and consumed | remaining == set(
        whole[: 12 + 3 * (88 // 3)]
    )
