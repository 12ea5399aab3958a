"""Fault injection: every reliability promise of docs/reliability.md has its test here."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys

import pytest
import torch

import q2l.training.checkpoint as checkpoint_module
from q2l.losses import AsymmetricLoss
from q2l.training.checkpoint import (
    CheckpointError,
    find_resumable,
    load_checkpoint,
)
from q2l.training.engine import NonFiniteError
from q2l.training.preemption import requeue_slurm_job
from q2l.training.run import train
from q2l.training.rundir import RunDirError

from .conftest import REPO_ROOT, run_python, tiny_overrides, wait_for

# 64 training images in batches of 16: 4 steps per epoch; 2 epochs; a checkpoint every 3 steps
# lands mid-epoch.
EXACT = ("trainer.deterministic=true", "trainer.checkpoint_every_steps=3", "model.dropout=0.1")


def _signal_at_call(monkeypatch, call: int, number: int = signal.SIGTERM) -> None:
    """Deliver `number` to this process during the `call`-th loss evaluation (mid-step)."""
    original = AsymmetricLoss.forward
    calls = {"n": 0}

    def forward(self, logits, targets):
        calls["n"] += 1
        if calls["n"] == call:
            signal.raise_signal(number)
        return original(self, logits, targets)

    monkeypatch.setattr(AsymmetricLoss, "forward", forward)


def _weights(path):
    return load_checkpoint(path)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_root):
    """Final weights and metrics of a run nothing happened to."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from q2l.config import CONFIG_DIR

    base = tmp_path_factory.mktemp("reference")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", tiny_overrides(digits_root, base / "cache") + list(EXACT))
    GlobalHydra.instance().clear()
    summary = train(cfg, base / "run")
    return base / "run", summary


@pytest.mark.slow
def test_sigterm_mid_step_saves_at_the_boundary_then_resume_is_exact(
    uninterrupted, tiny_cfg, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    _signal_at_call(monkeypatch, call=6)  # epoch 2, second step
    summary = train(tiny_cfg(*EXACT), run_dir)
    assert summary["status"] == "preempted"
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["step"], saved["progress"]["batches_done"]) == (
        1,
        6,
        2,
    )  # step 6 finished
    monkeypatch.undo()
    summary = train(tiny_cfg(*EXACT, "resume=auto"), run_dir)
    assert summary["status"] == "completed"
    reference_dir, reference = uninterrupted
    _assert_same_weights(
        _weights(run_dir / "checkpoints" / "last.pt"),
        _weights(reference_dir / "checkpoints" / "last.pt"),
    )
    assert summary["best"]["mAP"] == reference["best"]["mAP"]


@pytest.mark.slow
def test_second_signal_during_the_run_does_no_harm(tiny_cfg, tmp_path, monkeypatch):
    original = AsymmetricLoss.forward
    calls = {"n": 0}

    def forward(self, logits, targets):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
        return original(self, logits, targets)

    monkeypatch.setattr(AsymmetricLoss, "forward", forward)
    summary = train(tiny_cfg(*EXACT), tmp_path / "run")
    assert summary["status"] == "preempted"
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


@pytest.mark.slow
def test_kill_9_mid_epoch_then_rerun_equals_uninterrupted(
    uninterrupted, cli_env, digits_root, tmp_path
):
    run_dir = tmp_path / "run"
    command = [
        "train.py",
        *tiny_overrides(digits_root, tmp_path / "cache"),
        *EXACT,
        "trainer.keep_last=10",
        "resume=auto",
        f"hydra.run.dir={run_dir}",
    ]
    process = subprocess.Popen(
        [sys.executable, *command],
        cwd=REPO_ROOT,
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = run_dir / "checkpoints" / "step-00000003.pt"
    wait_for(target, process=process)
    process.kill()  # SIGKILL: no handler runs, whatever was being written is left as it is
    process.wait()
    assert target.exists()
    result = run_python(command, cli_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    reference_dir, _ = uninterrupted
    _assert_same_weights(
        _weights(run_dir / "checkpoints" / "last.pt"),
        _weights(reference_dir / "checkpoints" / "last.pt"),
    )


@pytest.mark.slow
def test_truncated_checkpoint_is_detected_and_auto_falls_back(tiny_cfg, tmp_path, caplog):
    run_dir = tmp_path / "run"
    train(tiny_cfg(*EXACT, "trainer.epochs=1"), run_dir)
    checkpoints = run_dir / "checkpoints"
    last = checkpoints / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(last)
    with caplog.at_level(logging.WARNING):
        path, payload = find_resumable(checkpoints)
    assert path.name == "step-00000003.pt" and payload["step"] == 3
    assert "last.pt" in caplog.text and "step-00000003.pt" in caplog.text
    summary = train(tiny_cfg(*EXACT, "trainer.epochs=1", "resume=auto"), run_dir)
    assert summary["status"] == "completed" and load_checkpoint(last)["step"] == 4


@pytest.mark.slow
def test_resume_refuses_a_changed_config_with_the_diff(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_cfg("trainer.epochs=1"), run_dir)
    with pytest.raises(
        ValueError, match=r"optimizer.lr: 0.001 -> 0.002[\s\S]*allow_config_change=true"
    ):
        train(tiny_cfg("trainer.epochs=1", "optimizer.lr=0.002", "resume=auto"), run_dir)
    summary = train(
        tiny_cfg(
            "trainer.epochs=2", "optimizer.lr=0.002", "resume=auto", "allow_config_change=true"
        ),
        run_dir,
    )
    assert summary["epochs_run"] == 2


@pytest.mark.slow
def test_resume_refuses_another_class_count_naming_the_keys(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_cfg("trainer.epochs=1"), run_dir)
    with pytest.raises(
        ValueError,
        match=r"does not fit this model: \d+ mismatched.*input_proj.weight: "
        r"checkpoint \(32, (\d+), 1, 1\) vs model \(16, \1, 1, 1\)",
    ):
        train(
            tiny_cfg(
                "trainer.epochs=2", "model.hidden_dim=16", "resume=auto", "allow_config_change=true"
            ),
            run_dir,
        )


@pytest.mark.slow
def test_init_from_loads_matching_weights_only(tiny_cfg, tmp_path, caplog):
    train(tiny_cfg("trainer.epochs=1"), tmp_path / "source")
    source = tmp_path / "source" / "checkpoints" / "last.pt"
    with caplog.at_level(logging.INFO):
        summary = train(tiny_cfg("trainer.epochs=1", f"init_from={source}"), tmp_path / "finetune")
    assert summary["epochs_run"] == 1  # a fresh run: epochs count from zero
    assert "init_from" in caplog.text and "loaded" in caplog.text


@pytest.mark.slow
def test_nan_loss_stops_before_the_step_and_never_reaches_a_checkpoint(
    tiny_cfg, tmp_path, monkeypatch
):
    original = AsymmetricLoss.forward
    calls = {"n": 0}

    def forward(self, logits, targets):
        calls["n"] += 1
        loss = original(self, logits, targets)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(AsymmetricLoss, "forward", forward)
    with pytest.raises(
        NonFiniteError,
        match=r"loss is not finite at step 6 \(nan\)[\s\S]*last good checkpoint: .*last.pt",
    ):
        train(tiny_cfg(*EXACT), tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["step"] == 4  # the end of epoch 1; steps 5 and 6 were never saved
    for path in (tmp_path / "run" / "checkpoints").glob("*.pt"):
        for tensor in load_checkpoint(path)["model"].values():
            assert torch.isfinite(tensor.float()).all()


@pytest.mark.slow
def test_fp16_scaler_skips_are_bounded(tiny_cfg, tmp_path, monkeypatch):
    # On CPU, fp16 autocast + GradScaler run the same code as on CUDA; a huge loss overflows the
    # fp16 gradients every step, so the scaler skips every update.
    original = AsymmetricLoss.forward
    monkeypatch.setattr(AsymmetricLoss, "forward", lambda self, x, y: original(self, x, y) * 1e30)
    with pytest.raises(NonFiniteError, match="skipped 3 steps in a row"):
        train(
            tiny_cfg(
                "trainer.precision=fp16",
                "trainer.max_consecutive_skipped_steps=2",
                "trainer.check_finite=false",
                "dataset.batch_size=2",  # fp16 backward is slow on a CPU: 20 s for 3 steps of 16
            ),
            tmp_path / "run",
        )


@pytest.mark.slow
def test_every_checkpoint_loads_with_weights_only(tiny_cfg, tmp_path):
    train(tiny_cfg(*EXACT), tmp_path / "run")
    paths = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert {p.name for p in paths} >= {"last.pt", "best.pt"}
    for path in paths:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        assert payload["format_version"] == checkpoint_module.FORMAT_VERSION


def test_unwritable_run_dir_fails_before_loading_data(tiny_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run directory should go")
    cfg = tiny_cfg("dataset.root=/nonexistent/data")  # would fail later, when the data is read
    with pytest.raises(RunDirError, match="cannot be created"):
        train(cfg, blocker / "run")


@pytest.mark.parametrize(
    ("environment", "job"),
    [
        ({"SLURM_JOB_ID": "12345"}, "12345"),
        (
            {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "12345", "SLURM_ARRAY_TASK_ID": "2"},
            "12345_2",
        ),
    ],
)
def test_slurm_requeue_calls_scontrol(monkeypatch, environment, job):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr("q2l.training.preemption.subprocess.run", fake_run)
    assert requeue_slurm_job()
    assert calls == [["scontrol", "requeue", job]]
