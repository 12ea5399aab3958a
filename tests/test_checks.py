"""Config values checked up front: an infinite or NaN number anywhere in a composed config fails
every command before anything is read, naming the key; every shipped config passes (each command's
defaults here; every option of every group in test_config, the paper presets in test_presets)."""

from __future__ import annotations

import pytest

import q2l.training.run as train_module
from q2l.cli import attention, evaluate, export, predict
from q2l.cli.validate_data import main as validate_main
from q2l.config.checks import ConfigValueError, check_values
from q2l.training.run import train

from .conftest import SENTINEL, fail_if_called

# Each command's config with its required keys: nothing named here exists.
COMMANDS = {
    "eval": ["ckpt=/nonexistent/best.pt"],
    "predict": ["ckpt=/nonexistent/best.pt", "input=/nonexistent", "output=/nonexistent/p.csv"],
    "export": ["ckpt=/nonexistent/best.pt"],
    "attention": ["ckpt=/nonexistent/best.pt", "image=/nonexistent.jpg", "output=/nonexistent"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_commands_defaults_pass_the_checks(compose_config, command):
    check_values(compose_config(command, COMMANDS[command]))


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ("optimizer.lr=inf", "optimizer.lr=inf"),  # a rule (lr >= 0) would have let it through
        ("loss.clip=nan", "loss.clip=nan"),
        ("trainer.grad_clip_norm=-inf", "trainer.grad_clip_norm=-inf"),
        ("augment.mix.mixup_alpha=nan", "augment.mix.mixup_alpha=nan"),  # no rule names it
        ("augment.scale=[0.08,inf]", "augment.scale[1]=inf"),
    ],
)
def test_a_non_finite_number_anywhere_fails_training_before_the_data(
    tiny_cfg, tmp_path, monkeypatch, override, shown
):
    fail_if_called(monkeypatch, train_module, "build_datasets", "data was read")
    with pytest.raises(ConfigValueError) as error:
        train(tiny_cfg(override), tmp_path / "run")
    assert f"{shown}: must be a finite number" in str(error.value)
    assert "must be 0 or more" not in str(error.value)  # one reason per key: the real one
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_a_finite_config_reaches_the_data(tiny_cfg, tmp_path, monkeypatch):
    """The positive control of the test above: its sentinel is on the path train() takes."""
    fail_if_called(monkeypatch, train_module, "build_datasets", "data was read")
    with pytest.raises(SENTINEL, match="data was read"):
        train(tiny_cfg(), tmp_path / "run")


@pytest.mark.parametrize(
    ("command", "entry", "override", "shown"),
    [
        ("eval", evaluate._hydra_main, "threshold=nan", "threshold=nan: must be a finite number"),
        ("export", export._hydra_main, "tolerance=inf", "tolerance=inf: must be a finite number"),
        ("attention", attention._hydra_main, "alpha=nan", "alpha=nan: must be a finite number"),
        ("predict", predict._hydra_main, "batch_size=0", "batch_size=0: must be at least 1"),
    ],
)
def test_every_command_checks_before_it_reads_anything(
    compose_config, command, entry, override, shown, capsys
):
    # The checkpoint and inputs do not exist: the value check has to come first to be seen.
    cfg = compose_config(command, [*COMMANDS[command], override])
    with pytest.raises(SystemExit) as stopped:
        entry(cfg)  # hydra.main's entry run on a composed config
    assert stopped.value.code == 2  # a user error: its message alone, no traceback
    assert shown in capsys.readouterr().err


def test_validate_data_refuses_a_non_finite_number(digits_root, capsys):
    overrides = ["experiment=demo", f"dataset.root={digits_root}", "optimizer.lr=inf"]
    assert validate_main(overrides) == 2
    assert "optimizer.lr=inf: must be a finite number" in capsys.readouterr().err
