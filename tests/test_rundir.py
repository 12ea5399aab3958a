"""q2l.training.rundir: the run directory's name (q2l_now, q2l_run_name), the `.q2l-run` marker
and the lock, and the saved overrides a `resume=auto` command line reuses."""

from __future__ import annotations

import datetime
import json
import logging
import pickle

import pytest
from omegaconf import OmegaConf

import q2l.training.rundir as rundir
from q2l.training.rundir import (
    LOCK_NAME,
    LOG_NAME,
    RUN_MARKER,
    RunDirectory,
    RunDirError,
    add_overrides,
    run_name,
    with_saved_overrides,
)

NOON = datetime.datetime(2026, 1, 2, 12, 0, 0, 123456)


@pytest.fixture(autouse=True)
def _resolvers():
    """q2l_now and q2l_run_name, as importing q2l.config registers them."""
    rundir.register_resolvers()


@pytest.fixture
def fresh_run_time(monkeypatch):
    """No run time decided yet in this process (restored afterwards)."""
    monkeypatch.setattr(rundir, "_RUN_TIME", None)


# ---- the directory's name ----


def test_q2l_now_is_the_first_calls_time_and_every_later_one_reuses_it(fresh_run_time):
    first = rundir.run_time()
    assert rundir.run_time() is first
    cfg = OmegaConf.create({"day": "${q2l_now:%Y-%m-%d}", "time": "${q2l_now:%H-%M-%S-%f}"})
    assert cfg.time == first.strftime("%H-%M-%S-%f") and cfg.day == first.strftime("%Y-%m-%d")


def test_q2l_now_is_resolved_once_and_travels_with_the_pickled_config(fresh_run_time):
    rundir.set_run_time(NOON)  # what rank 0 broadcast to every process of a torchrun job
    cfg = OmegaConf.create({"dir": "outputs/${q2l_now:%H-%M-%S-%f}"})
    assert cfg.dir == "outputs/12-00-00-123456"
    shipped = pickle.dumps(cfg)  # a submitted sweep job (submitit pickles the config)
    rundir.set_run_time(NOON + datetime.timedelta(hours=1))  # the job's process starts later
    assert pickle.loads(shipped).dir == "outputs/12-00-00-123456"  # the resolver's cache went along
    assert cfg.dir == "outputs/12-00-00-123456"
    assert OmegaConf.create({"dir": "${q2l_now:%H}"}).dir == "13"  # a new config: the new time


def test_q2l_run_name_joins_the_experiment_backbone_and_head_choices():
    choices = {"experiment": "demo", "dataset": "digits", "backbone": "resnet18", "model": "q2l"}
    assert run_name(choices) == "demo_resnet18_q2l"
    assert run_name({**choices, "experiment": None}) == "digits_resnet18_q2l"
    assert run_name({"dataset": "my data/v2", "model": "q2l"}) == "my-data-v2_q2l"  # file-safe
    cfg = OmegaConf.create({"choices": choices, "name": "${q2l_run_name:${choices}}"})
    assert cfg.name == "demo_resnet18_q2l"


def test_hydras_run_and_sweep_folders_take_the_name_and_one_time(fresh_run_time):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from q2l.config import CONFIG_DIR

    rundir.set_run_time(NOON)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", ["experiment=demo"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    name = "12-00-00-123456_demo_resnet10t_q2l_small"
    assert cfg.hydra.run.dir == f"outputs/2026-01-02/{name}"
    assert cfg.hydra.sweep.dir == f"outputs/multirun/2026-01-02/{name}"


# ---- the marker and the lock ----


def test_a_new_folder_is_marked_a_q2l_run_once_started(tmp_path):
    path = tmp_path / "run"
    with RunDirectory(path) as run:
        assert not run.existing and not run.started
        assert sorted(p.name for p in path.iterdir()) == [LOCK_NAME]  # nothing else yet
        run.start(OmegaConf.create({"seed": 1, "copy": "${seed}"}))
        assert run.started
        logging.getLogger("q2l.test").warning("into train.log")
    assert json.loads((path / RUN_MARKER).read_text()) == {"created_by": "q2l"}
    assert OmegaConf.load(path / "config.yaml") == {"seed": 1, "copy": 1}  # resolved
    assert "into train.log" in (path / LOG_NAME).read_text()
    with RunDirectory(path) as again:
        assert again.existing  # the marker makes it a q2l run


def test_a_folder_with_files_but_no_marker_is_refused_unchanged(tmp_path):
    (tmp_path / "config.yaml").write_text("theirs\n")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RunDirError, match=rf"{tmp_path} holds files but no \.q2l-run marker"):
        RunDirectory(tmp_path).open()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.yaml"]


def test_a_folder_holding_only_a_lock_file_is_new(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")  # a start refused before it wrote anything
    with RunDirectory(tmp_path) as run:
        assert not run.existing


def test_a_second_opener_is_refused_naming_the_holder_until_the_first_closes(tmp_path):
    first = RunDirectory(tmp_path).open()
    with pytest.raises(RunDirError, match=r"in use by q2l pid \d+ on .* since"):
        RunDirectory(tmp_path).open()
    first.close()
    with RunDirectory(tmp_path):
        pass


def test_preflight_names_a_folder_that_is_not_writable(tmp_path):
    with RunDirectory(tmp_path / "run") as run:
        (tmp_path / "run" / "tensorboard").write_text("a file where a folder goes")
        with pytest.raises(RunDirError, match=r"tensorboard is not writable"):
            run.preflight()
        assert (tmp_path / "run" / "checkpoints").is_dir()


def test_leftover_temporary_files_are_removed(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / ".last.pt.abc123.tmp").write_bytes(b"half")
    (checkpoints / "last.pt").write_bytes(b"whole")
    RunDirectory(tmp_path).remove_temporaries()
    assert [p.name for p in checkpoints.iterdir()] == ["last.pt"]


# ---- resume=auto's saved overrides ----


def test_resume_auto_alone_gets_the_runs_saved_overrides_its_own_win(tmp_path, capsys):
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(
        OmegaConf.create(["experiment=demo", "trainer.epochs=5"]),
        tmp_path / ".hydra" / "overrides.yaml",
    )
    argv = ["resume=auto", f"hydra.run.dir={tmp_path}", "trainer.epochs=8"]
    assert with_saved_overrides(argv) == ["experiment=demo", *argv]
    assert "continuing" in capsys.readouterr().err
    for unchanged in (
        [f"hydra.run.dir={tmp_path}"],  # no resume=auto
        ["resume=auto"],  # no run directory named
        ["-m", "resume=auto", f"hydra.run.dir={tmp_path}"],  # a sweep
        ["resume=auto", f"hydra.run.dir={tmp_path / 'new'}"],  # nothing saved there
    ):
        assert with_saved_overrides(unchanged) == unchanged


def test_add_overrides_puts_options_first_then_the_saved_overrides_then_the_commands():
    argv = ["--config-dir", "mine", "lr=2", "--info", "defaults"]
    assert add_overrides(argv, ["lr=1", "seed=3"], flags=["-m"]) == [
        *["--config-dir", "mine", "--info", "defaults", "-m"],
        *["lr=1", "seed=3", "lr=2"],
    ]
    # --info's value is optional: an override after it stays an override.
    assert add_overrides(["--info", "lr=2"], ["seed=3"]) == ["--info", "seed=3", "lr=2"]
