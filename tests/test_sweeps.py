"""Sweeps through Hydra's plugins: the SLURM launcher's local twin (submitit), and Optuna."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO_ROOT, tiny_overrides, wait_for


def _sweep(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _rows(sweep_dir: Path) -> list[dict]:
    return list(csv.DictReader((sweep_dir / "summary.csv").open()))


def _job_processes(folder: Path) -> list[int]:
    """Pids of the submitit job processes running from `folder` (found by their command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in command and str(folder) in command:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def env(tmp_path) -> dict:
    return {**os.environ, "Q2L_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_local_launcher_runs_a_sweep_whose_preempted_jobs_requeue_and_resume(
    digits_root, tmp_path, env
):
    sweep_dir = tmp_path / "sweep"
    process = _sweep(
        [
            "-m",
            "hydra/launcher=local",
            *tiny_overrides(digits_root, tmp_path / "cache"),
            "trainer.epochs=4",
            "optimizer.lr=1e-3,2e-3",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        env,
    )
    wait_for(*(sweep_dir / job / "checkpoints" / "last.pt" for job in ("0", "1")))
    jobs = _job_processes(sweep_dir / ".submitit")
    assert len(jobs) == 2
    for pid in jobs:
        os.kill(pid, signal.SIGUSR2)  # submitit's preemption signal, as SLURM sends it
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]
    rows = _rows(sweep_dir)
    assert [row["status"] for row in rows] == ["completed", "completed"]
    assert sorted(row["optimizer.lr"] for row in rows) == ["0.001", "0.002"]
    for job in ("0", "1"):
        log = (sweep_dir / job / "train.log").read_text()
        assert "SIGUSR2 received" in log and "resumed from" in log and "epoch 4/4" in log


@pytest.mark.slow
def test_each_task_of_a_submitit_job_is_one_ddp_rank(digits_root, tmp_path, env):
    sweep_dir = tmp_path / "sweep"
    process = _sweep(
        [
            "-m",
            "hydra/launcher=local",
            "hydra.launcher.tasks_per_node=2",
            *tiny_overrides(digits_root, tmp_path / "cache"),
            "dataset.batch_size=8",
            "trainer.epochs=1",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        env,
    )
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]
    assert [row["status"] for row in _rows(sweep_dir)] == ["completed"]
    assert "2 process(es), global batch 16" in (sweep_dir / "0" / "train.log").read_text()


@pytest.mark.slow
def test_optuna_search_returns_the_best_trial_and_lists_every_one(digits_root, tmp_path, env):
    sweep_dir = tmp_path / "sweep"
    process = _sweep(
        [
            "hparams_search=asl_optuna",
            *tiny_overrides(digits_root, tmp_path / "cache"),
            "trainer.epochs=1",
            "hydra.sweeper.n_trials=3",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        env,
    )
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]
    rows = _rows(sweep_dir)
    assert len(rows) == 3 and {row["status"] for row in rows} == {"completed"}
    assert all(row["loss.gamma_neg"] and row["optimizer.lr"] for row in rows)
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["best_value"]
    assert best == pytest.approx(max(float(row["best_mAP"]) for row in rows), abs=1e-3)
