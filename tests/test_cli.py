"""The commands as a new user meets them: `--help` with nothing else, a user's mistake as one
short message and exit 2 (a bug keeps its traceback), and no leftovers from a start that failed."""

from __future__ import annotations

import os
import sys

import pytest

from q2l.cli import attention, evaluate, export, predict, train
from q2l.cli.help import COMMANDS, command_help
from q2l.cli.reporting import run_command
from q2l.config.fields import described
from q2l.config.schemas import group_schemas
from q2l.training.engine import NonFiniteError
from q2l.utils.errors import ConfigError

from .conftest import REPO_ROOT, run_python


@pytest.mark.parametrize(
    ("command", "main"),
    [
        ("train", train.main),
        ("eval", evaluate.main),
        ("predict", predict.main),
        ("export", export.main),
        ("attention", attention.main),
    ],
)
def test_help_needs_no_other_argument(command, main, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prog", "--help"])
    main()
    shown = capsys.readouterr().out
    assert shown == command_help(command) + "\n"
    assert COMMANDS[command]["usage"] in shown and "Keys" in shown


def test_train_help_lists_groups_options_and_main_keys():
    shown = command_help("train")
    for text in (
        "dataset          (required) coco2014",
        "backbone         [resnet50]",
        "asl_optuna",
    ):
        assert text in shown
    for key in ("dataset.root", "trainer.epochs", "optimizer.lr", "backbone.weights", "resume"):
        assert f"  {key} " in shown
    assert "loss.gamma_neg" in command_help("train", "loss")
    assert "loss.reduction" in command_help("train", "loss=bce")
    assert "trainer.overfit_batches" in command_help("train", "trainer")
    assert "no help on 'nonsense'" in command_help("train", "nonsense")


def test_every_key_has_its_description_in_the_schema():
    from q2l.config import commands, schemas

    nodes = [node if isinstance(node, type) else type(node) for _, _, node in group_schemas()]
    nodes += [schemas.TrainConf, schemas.TrainerConf, schemas.DatasetConf, schemas.PathsConf]
    nodes += [commands.EvalConf, commands.PredictConf, commands.ExportConf, commands.AttentionConf]
    missing = [f"{n.__name__}.{key}" for n in nodes for key, _, about in described(n) if not about]
    assert missing == []


def test_a_user_error_is_its_message_alone_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("Q2L_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def refuse():
        raise ConfigError("trainer.epochs=0: must be at least 1")

    with pytest.raises(SystemExit) as stopped:
        run_command("q2l-x", refuse)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "q2l-x: error: trainer.epochs=0: must be at least 1\n"

    def diverge():
        raise NonFiniteError("loss is not finite at step 3")

    with pytest.raises(SystemExit) as stopped:
        run_command("q2l-x", diverge)
    assert stopped.value.code == 1

    def bug():
        return {}["missing"]

    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_command("q2l-x", bug)
    for switch in ("Q2L_DEBUG", "HYDRA_FULL_ERROR"):  # either shows a user error's traceback too
        monkeypatch.setenv(switch, "1")
        with pytest.raises(ConfigError):
            run_command("q2l-x", refuse)
        monkeypatch.delenv(switch)


@pytest.mark.slow
def test_a_refused_start_prints_one_message_exits_2_and_leaves_no_directory(tmp_path, cli_env):
    work = tmp_path / "work"
    work.mkdir()
    train_py = str(REPO_ROOT / "train.py")
    result = run_python([train_py, "experiment=demo", "trainer.epochs=0"], cli_env, cwd=work)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert output.count("trainer.epochs=0: must be at least 1") == 1
    assert "Traceback" not in output
    assert [p for p in work.rglob("*") if p.is_file()] == []  # no run directory left behind
    assert not list((work / "outputs").glob("*")) if (work / "outputs").exists() else True

    given = work / "given"
    given.mkdir()  # an empty folder of the user's: kept, and left empty
    result = run_python(
        [train_py, "experiment=demo", "trainer.epochs=0", f"hydra.run.dir={given}"], cli_env
    )
    assert result.returncode == 2 and given.is_dir() and list(given.iterdir()) == []

    evaluated = run_python([str(REPO_ROOT / "eval.py"), "ckpt=missing.pt"], cli_env, cwd=work)
    assert evaluated.returncode == 2
    assert evaluated.stderr.strip().splitlines()[-1] == (
        "q2l-eval: error: checkpoint not found: missing.pt"
    )


@pytest.mark.slow
def test_a_command_loads_its_libraries_with_the_collector_paused_then_frozen():
    """q2l.cli pauses the cyclic collector while torch, torchvision and timm load (about 1 s of a
    command's start-up), turns it back on and freezes what loaded; a collector the caller had
    turned off stays off."""
    check = (
        "import gc\n"
        "import q2l.cli.train\n"
        "print(gc.isenabled(), gc.get_freeze_count() > 100_000)\n"
        "gc.disable()\n"
        "q2l.cli._load_shared_libraries()\n"
        "print(gc.isenabled())\n"
    )
    result = run_python(["-c", check], {**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-2:] == ["True True", "False"]
