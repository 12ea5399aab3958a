"""Issue 16: where users scale out, preempted, failed and parallel jobs lose nothing.

Tests numbered by the issue's points; the launcher tests drive the real launchers on CPU (Hydra's
basic launcher, submitit's local executor, Optuna through q2l's sweeper). docs/reliability.md maps
each guarantee to its test; the torchrun ones are in tests/test_distributed.py.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from q2l.training.checkpoint import CheckpointError, find_resumable, load_checkpoint
from q2l.training.engine import NonFiniteError
from q2l.training.preemption import EXIT_PREEMPTED, StopRequested
from q2l.training.run import train
from q2l.training.rundir import LOCK_NAME, RunDirError
from q2l.training.sweep import check_continuation, summarize_sweep, to_markdown, write_sweep_summary

from .conftest import REPO_ROOT, run_python, tiny_overrides, train_on_one_thread
from .helpers.damage import flip_a_bit

TRAIN = str(REPO_ROOT / "train.py")
FAULTY = str(REPO_ROOT / "tests" / "helpers" / "faulty_train.py")
# 64 training images in batches of 16: 4 steps per epoch.
EXACT = ("trainer.deterministic=true",)


@pytest.fixture
def env(tmp_path) -> dict:
    return {
        **os.environ,
        "Q2L_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _start(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    """`python <args>` in its own process group (so a test can signal the group, as SLURM does)."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _sweep_dirs(work: Path) -> list[Path]:
    return sorted(p for p in (work / "outputs" / "multirun").glob("*/*") if p.is_dir())


def _wait_for_glob(
    work: Path, pattern: str, process: subprocess.Popen, timeout: float = 240, skip=()
) -> Path:
    """The first path under `work` matching `pattern` (and not in `skip`), once one exists."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        found = sorted(set(work.glob(pattern)) - set(skip))
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"{pattern} never appeared under {work}")


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


def _same_weights(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content hash (the run's lock file aside: opening a run
    writes the holder's pid into it)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


# 1. A sweep's folder is decided once; a preempted job continues in its own folder, bitwise.


@pytest.mark.slow
def test_1_a_preempted_sweep_job_continues_in_its_folder_and_ends_bitwise_equal(
    digits_root, tmp_path, env, tiny_cfg
):
    work = tmp_path / "work"
    work.mkdir()
    overrides = [*tiny_overrides(digits_root, tmp_path / "cache"), *EXACT, "trainer.epochs=2"]
    # No hydra.sweep.dir: the default, timestamped folder, resolved by each job process again.
    process = _start(
        [TRAIN, "-m", "hydra/launcher=local", *overrides, "optimizer.lr=1e-3,2e-3"], work, env
    )
    # Each job is preempted once its first epoch is saved, while its second runs (waiting for
    # both before signalling either let a job that ran ahead finish first).
    signalled = set()
    while len(signalled) < 2:
        last = _wait_for_glob(
            work, "outputs/multirun/*/*/[01]/checkpoints/last.pt", process, skip=signalled
        )
        job_dir = last.parent.parent
        [sweep_dir] = _sweep_dirs(work)
        pid = int(re.match(r"q2l pid (\d+)", (job_dir / LOCK_NAME).read_text()).group(1))
        assert pid in _job_processes(sweep_dir.relative_to(work) / ".submitit")
        os.kill(pid, signal.SIGUSR2)  # submitit's preemption signal, as SLURM sends it
        signalled.add(last)
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]

    assert _sweep_dirs(work) == [sweep_dir]  # one folder for the sweep and its requeued jobs
    rows = _rows(sweep_dir)
    assert sorted(row["optimizer.lr"] for row in rows) == ["0.001", "0.002"]
    assert [row["status"] for row in rows] == ["completed", "completed"]
    for job in ("0", "1"):
        log = (sweep_dir / job / "train.log").read_text()
        assert "SIGUSR2 received" in log and "resumed from" in log and "epoch 2/2" in log
    # The uninterrupted run, on one thread as the jobs ran (env's OMP_NUM_THREADS=1).
    reference = train_on_one_thread(
        tiny_cfg(*EXACT, "trainer.epochs=2", "optimizer.lr=1e-3"), tmp_path / "reference"
    )
    assert reference["status"] == "completed"
    _same_weights(
        sweep_dir / "0" / "checkpoints" / "last.pt",
        tmp_path / "reference" / "checkpoints" / "last.pt",
    )


# 2. tasks_per_node=N: one run directory, rank 0 writes.


@pytest.mark.slow
def test_2_the_tasks_of_a_submitit_job_share_one_run_directory(digits_root, tmp_path, env):
    work = tmp_path / "work"
    work.mkdir()
    process = _start(
        [
            TRAIN,
            "-m",
            "hydra/launcher=local",
            "hydra.launcher.tasks_per_node=2",
            *tiny_overrides(digits_root, tmp_path / "cache"),
            "dataset.batch_size=8",
            "trainer.epochs=1",
        ],
        work,
        env,
    )
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]
    [sweep_dir] = _sweep_dirs(work)
    assert sorted(p.name for p in sweep_dir.iterdir() if not p.name.startswith(".")) == [
        "0",
        "multirun.yaml",
        "summary.csv",
        "summary.md",
    ]
    assert [p.parent.name for p in work.rglob("train.log")] == ["0"]  # no second run directory
    assert [row["status"] for row in _rows(sweep_dir)] == ["completed"]
    assert "2 process(es), global batch 16" in (sweep_dir / "0" / "train.log").read_text()


# 3. An interrupted sweep (basic launcher) exits 75 with its summary, and continues when rerun.


@pytest.mark.slow
def test_3_a_stopped_sweep_writes_its_summary_and_continues_into_its_folder(
    digits_root, tmp_path, env
):
    work = tmp_path / "work"
    work.mkdir()
    overrides = [*tiny_overrides(digits_root, tmp_path / "cache"), *EXACT]
    process = _start(
        [TRAIN, "-m", *overrides, "trainer.epochs=2", "optimizer.lr=1e-3,2e-3,3e-3"], work, env
    )
    # Job 1's first epoch is saved: stopped during its second.
    _wait_for_glob(work, "outputs/multirun/*/*/1/checkpoints/last.pt", process)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, output[-3000:]
    [sweep_dir] = _sweep_dirs(work)
    rows = {row["job"]: row for row in _rows(sweep_dir)}
    assert [rows[job]["status"] for job in "012"] == ["completed", "preempted", "not started"]
    assert rows["2"]["optimizer.lr"] == "0.003"
    finished = _tree(sweep_dir / "0")

    # The same sweep into its folder: `-m hydra.sweep.dir=<sweep>` alone reuses its arguments.
    result = run_python([TRAIN, "-m", f"hydra.sweep.dir={sweep_dir}"], env, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already finished" in result.stdout + result.stderr
    assert _tree(sweep_dir / "0") == finished  # a finished job is left exactly as it was
    assert "resumed from" in (sweep_dir / "1" / "train.log").read_text()
    assert [row["status"] for row in _rows(sweep_dir)] == ["completed"] * 3
    assert _sweep_dirs(work) == [sweep_dir]


def test_3_a_different_sweep_into_a_sweeps_folder_is_refused(tmp_path):
    from omegaconf import OmegaConf

    saved = {"hydra": {"overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": ["seed=1,2"]}}}
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "multirun.yaml")
    same = OmegaConf.create(
        {"hydra": {"overrides": {"hydra": [f"hydra.sweep.dir={tmp_path}"], "task": ["seed=1,2"]}}}
    )
    check_continuation(tmp_path, same)  # the same sweep continues
    other = OmegaConf.create({"hydra": {"overrides": {"hydra": [], "task": ["seed=3"]}}})
    with pytest.raises(ValueError, match="holds another sweep.*seed=1,2.*seed=3"):
        check_continuation(tmp_path, other)


def test_3_the_summary_has_a_column_per_swept_key_best_first_and_errors_on_one_line(tmp_path):
    def job(number: int, lr: str, metrics: str | None) -> None:
        folder = tmp_path / str(number)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(
            f"- experiment=demo\n- optimizer.lr={lr}\n"
        )
        (folder / ".q2l-run").write_text("{}")
        if metrics is not None:
            (folder / "metrics.json").write_text(metrics)

    job(
        0,
        "0.001",
        '{"status": "completed", "monitor": "mAP", "best": {"value": 70.0, '
        '"mAP": 70.0, "epoch": 2, "weights": "ema"}}',
    )
    job(
        1,
        "0.002",
        '{"status": "completed", "monitor": "mAP", "best": {"value": 80.0, '
        '"mAP": 80.0, "epoch": 3, "weights": "model"}}',
    )
    job(2, "-1", '{"status": "failed", "error": "ValueError: bad\\nsecond | line"}')
    job(3, "0.004", None)  # started, no metrics.json, lock free: interrupted
    rows = write_sweep_summary(tmp_path)
    assert [(r.job, r.status) for r in rows] == [
        ("1", "completed"),
        ("0", "completed"),
        ("2", "failed"),
        ("3", "interrupted"),
    ]
    table = _rows(tmp_path)
    assert list(table[0]) == [
        "job",
        "optimizer.lr",
        "status",
        "best_mAP",
        "best_epoch",
        "weights",
        "error",
        "run_dir",
    ]
    assert table[2]["error"] == "ValueError: bad / second | line"
    markdown = (tmp_path / "summary.md").read_text()
    assert markdown.startswith("common overrides: `experiment=demo`")
    assert "ValueError: bad / second \\| line" in markdown
    assert len(markdown.strip().splitlines()) == 2 + 2 + 4  # heading, blank, header, rule, 4 rows
    assert to_markdown(summarize_sweep(tmp_path)) in markdown


# 4. Optuna: a failing trial is recorded and the search goes on; an interrupted search resumes.


def _study(sweep_dir: Path):
    import optuna

    return optuna.load_study(study_name="asl_and_lr", storage=f"sqlite:///{sweep_dir}/optuna.db")


@pytest.mark.slow
def test_4_a_failing_trial_is_recorded_and_the_search_goes_on(digits_root, tmp_path, env):
    work = tmp_path / "work"
    work.mkdir()
    result = run_python(
        [
            TRAIN,
            "hparams_search=asl_optuna",
            *tiny_overrides(digits_root, tmp_path / "cache"),
            "trainer.epochs=1",
            "hydra.sweeper.n_trials=3",
            "optimizer.lr=choice(1e45,1e-3)",  # 1e45: the loss turns NaN at the second step
        ],
        env,
        cwd=work,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [sweep_dir] = _sweep_dirs(work)
    rows = _rows(sweep_dir)
    assert len(rows) == 3 and {row["status"] for row in rows} == {"completed", "failed"}
    assert all("not finite" in row["error"] for row in rows if row["status"] == "failed")
    trials = _study(sweep_dir).trials
    assert {t.state.name for t in trials} == {"COMPLETE", "FAIL"}
    assert all("not finite" in t.user_attrs["error"] for t in trials if t.state.name == "FAIL")
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["best_value"]
    completed = [float(row["best_mAP"]) for row in rows if row["status"] == "completed"]
    assert best == pytest.approx(max(completed), abs=1e-3)


@pytest.mark.slow
def test_4_an_interrupted_search_resumes_with_its_trials(digits_root, tmp_path, env):
    work = tmp_path / "work"
    work.mkdir()
    process = _start(
        [
            TRAIN,
            "hparams_search=asl_optuna",
            *tiny_overrides(digits_root, tmp_path / "cache"),
            *EXACT,
            "trainer.epochs=2",
            "hydra.sweeper.n_trials=3",
        ],
        work,
        env,
    )
    # Trial 1's first epoch is saved: stopped during its second.
    _wait_for_glob(work, "outputs/multirun/*/*/1/checkpoints/last.pt", process)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, output[-3000:]
    [sweep_dir] = _sweep_dirs(work)
    assert [t.state.name for t in _study(sweep_dir).trials] == ["COMPLETE", "RUNNING"]

    result = run_python([TRAIN, f"hydra.sweep.dir={sweep_dir}"], env, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _study(sweep_dir).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # n_trials in all, not 3 more
    assert "resumed from" in (sweep_dir / "1" / "train.log").read_text()
    assert [row["status"] for row in _rows(sweep_dir)] == ["completed"] * 3
    assert (sweep_dir / "optimization_results.yaml").is_file()


# 5. A stop signal at any moment, start-up included: exit 75, nothing half-written, resumable.


def _signal_in(monkeypatch, module, function: str, number=signal.SIGTERM) -> None:
    original = getattr(module, function)

    def signalled(*args, **kwargs):
        signal.raise_signal(number)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function, signalled)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("phase", "module", "function"),
    [
        ("data check", "q2l.training.build", "validate_splits"),
        ("demo build", "q2l.demo.digits", "build_digits_coco"),
        ("model build", "q2l.training.run", "build_model"),
        ("state build", "q2l.training.run", "build_state"),
    ],
)
def test_5_a_signal_during_start_up_stops_at_once_and_the_rerun_completes(
    phase, module, function, tiny_cfg, tmp_path, monkeypatch
):
    import importlib

    run_dir = tmp_path / "run"
    _signal_in(monkeypatch, importlib.import_module(module), function, signal.SIGUSR1)
    with pytest.raises(StopRequested, match="SIGUSR1"):
        train(tiny_cfg("trainer.epochs=1"), run_dir)
    monkeypatch.undo()
    assert '"status": "preempted"' in (run_dir / "metrics.json").read_text()
    assert not list(run_dir.rglob("*.tmp"))
    summary = train(tiny_cfg("trainer.epochs=1"), run_dir)
    assert summary["status"] == "completed"


@pytest.mark.slow
def test_5_a_signal_while_loading_the_checkpoint_to_resume_changes_nothing(
    tiny_cfg, tmp_path, monkeypatch
):
    import q2l.training.plan as plan_module
    from q2l.losses import AsymmetricLoss

    run_dir = tmp_path / "run"
    _signal_in(monkeypatch, AsymmetricLoss, "forward")  # while training: saved, then stopped
    assert train(tiny_cfg(), run_dir)["status"] == "preempted"
    monkeypatch.undo()
    before = _tree(run_dir)
    _signal_in(monkeypatch, plan_module, "find_resumable")
    with pytest.raises(StopRequested):
        train(tiny_cfg(), run_dir)  # resume=auto: it would continue the run
    monkeypatch.undo()
    assert _tree(run_dir) == before
    summary = train(tiny_cfg(), run_dir)
    assert summary["status"] == "completed" and summary["epochs_run"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGUSR1", "SIGTERM"])
def test_5_the_cli_stopped_during_start_up_exits_75(name, digits_root, tmp_path, env):
    run_dir = tmp_path / "run"
    result = run_python(
        [
            FAULTY,
            *tiny_overrides(digits_root, tmp_path / "cache"),
            "trainer.epochs=1",
            f"hydra.run.dir={run_dir}",
        ],
        {**env, "Q2L_TEST_SIGNAL": f"0:validate:{name}"},
    )
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-3000:]
    assert f"{name} received before training started" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


# 7. Checkpoints: never non-finite; a checksum verified on every load; auto resume falls back.


@pytest.mark.slow
def test_7_weights_that_turn_non_finite_are_never_saved(tiny_cfg, tmp_path, monkeypatch):
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the update of step 3 diverges; its loss was still finite
            self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run_dir = tmp_path / "run"
    with pytest.raises(
        NonFiniteError,
        match=r"after step 3 the model weights and EMA weights.*non-finite[\s\S]*"
        r"nothing was saved from this step; last good checkpoint: .*last.pt",
    ):
        train(tiny_cfg("trainer.checkpoint_every_steps=1", "trainer.keep_last=5"), run_dir)
    monkeypatch.undo()
    saved = sorted((run_dir / "checkpoints").glob("*.pt"))
    assert [p.name for p in saved] == ["last.pt", "step-00000001.pt", "step-00000002.pt"]
    for path in saved:
        payload = load_checkpoint(path)
        assert payload["step"] <= 2
        for part in ("model", "ema"):
            assert all(torch.isfinite(t.float()).all() for t in payload[part].values())
    # The rerun continues from the last good checkpoint (the checkpoint interval may change).
    assert train(tiny_cfg(), run_dir)["status"] == "completed"


@pytest.mark.slow
def test_7_a_checkpoint_with_flipped_bits_is_refused_everywhere_and_auto_falls_back(
    tiny_cfg, compose_config, tmp_path, caplog
):
    from q2l.evaluation.evaluate import evaluate_checkpoint
    from q2l.inference.export import export

    run_dir = tmp_path / "run"
    train(tiny_cfg("trainer.epochs=1", "trainer.checkpoint_every_steps=3"), run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    best = run_dir / "checkpoints" / "best.pt"
    best.unlink()  # a hard link to last.pt: make it a file of its own, still intact
    best.write_bytes(last.read_bytes())
    record = flip_a_bit(last)
    torch.load(last, weights_only=True)  # what torch itself would load, silently
    damaged = rf"{last} is damaged: record '{record}' fails its CRC-32 checksum"
    with pytest.raises(CheckpointError, match=damaged):
        load_checkpoint(last)
    with pytest.raises(CheckpointError, match=damaged):
        evaluate_checkpoint(compose_config("eval", [f"ckpt={last}"]))
    with pytest.raises(CheckpointError, match=damaged):
        export(compose_config("export", [f"ckpt={last}", f"output={tmp_path / 'm.onnx'}"]))
    with pytest.raises(CheckpointError, match=damaged):
        train(tiny_cfg("trainer.epochs=1", f"init_from={last}"), tmp_path / "tuned")
    with pytest.raises(CheckpointError, match=damaged):
        train(tiny_cfg("trainer.epochs=2", f"resume={last}"), tmp_path / "resumed")
    with caplog.at_level(logging.WARNING):
        path, payload = find_resumable(run_dir / "checkpoints")
    assert path.name == "step-00000003.pt"
    assert "resuming from" in caplog.text and "instead of the unreadable last.pt" in caplog.text
    summary = train(tiny_cfg("trainer.epochs=1", "trainer.checkpoint_every_steps=3"), run_dir)
    assert summary["status"] == "completed" and load_checkpoint(last)["step"] == 4


def test_7_predict_and_import_check_the_checksum_too(
    tiny_checkpoint, digits_root, compose_config, tmp_path
):
    import shutil

    from q2l.inference.predict import predict
    from q2l.training.importing import import_official

    copy = tmp_path / "best.pt"
    copy.write_bytes(tiny_checkpoint.read_bytes())
    flip_a_bit(copy)
    (tmp_path / "photos").mkdir()
    shutil.copy(next((digits_root / "val2014").iterdir()), tmp_path / "photos")
    with pytest.raises(CheckpointError, match="fails its CRC-32 checksum"):
        predict(
            compose_config(
                "predict",
                [f"ckpt={copy}", f"input={tmp_path / 'photos'}", f"output={tmp_path / 'p.csv'}"],
            )
        )
    official = tmp_path / "official.pkl"
    torch.save({"state_dict": {"a": torch.randn(1000)}}, official)
    flip_a_bit(official)
    with pytest.raises(ValueError, match="official Query2Label checkpoint .* is damaged"):
        import_official(official, tmp_path / "imported.pt")


# 8. Only a folder carrying q2l's marker is a q2l run.


def test_8_another_hydra_projects_run_folder_is_refused_byte_for_byte(tiny_cfg, tmp_path):
    folder = tmp_path / "their-run"
    (folder / ".hydra").mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    (folder / "config.yaml").write_text("model: theirs\n")
    (folder / ".hydra" / "overrides.yaml").write_text("- lr=1\n")
    (folder / "checkpoints" / "epoch_001.ckpt").write_bytes(b"their weights")
    (folder / "train.log").write_text("their log\n")
    before = _tree(folder)
    with pytest.raises(RunDirError, match="no .q2l-run marker.*nothing was changed"):
        train(tiny_cfg("trainer.epochs=1"), folder)
    assert _tree(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == [
        ".hydra",
        "checkpoints",
        "config.yaml",
        "train.log",
    ]
