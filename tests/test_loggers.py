"""The logger group (q2l.training.loggers): composing one, several or none; hyperparameters under
option names; MLflow for real in a SQLite tracking store read back with its client; W&B offline,
read back from its run file; CSV read back; a resumed run continuing the same backend runs; the
missing-package error; a failing backend dropped while training goes on."""

from __future__ import annotations

import csv
import json
import logging
import re
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from q2l.config import CONFIG_DIR
from q2l.config.checks import ConfigValueError
from q2l.training.loggers import Hyperparameters, RunLogger, build_loggers, run_hyperparameters
from q2l.training.loggers.backend_runs import RUNS_FILE
from q2l.training.loggers.csv_logs import CSVLogger
from q2l.training.records import EpochRecord
from q2l.training.run import resolved, train
from q2l.training.run_log import RunLog

from .conftest import tiny_overrides
from .helpers.wandb_files import read_offline_run


def _compose_with_hydra(overrides: list[str]):
    """(config, Hydra's job config) as @hydra.main hands them to q2l.cli.train."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    hydra = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, hydra


def test_the_logger_group_composes_one_several_or_none(compose_config):
    def loggers(*overrides):
        return list(compose_config("train", ["experiment=demo", *overrides]).logger)

    assert loggers() == ["tensorboard"]
    assert loggers("logger=mlflow") == ["mlflow"]
    assert loggers("logger=[tensorboard,mlflow]") == ["tensorboard", "mlflow"]
    assert loggers("logger=[csv,wandb]", "logger.wandb.project=kitchen") == ["csv", "wandb"]
    assert loggers("logger=none") == loggers("logger=[]") == []
    with pytest.raises(Exception, match="trackin_uri"):
        loggers("logger=mlflow", "logger.mlflow.trackin_uri=x")
    with pytest.raises(Exception, match="ofline"):
        loggers("logger=wandb", "logger.wandb.mode=ofline")


def test_only_chosen_loggers_are_built(tmp_path, caplog):
    # An experiment's settings for mlflow, which the command line then left out (logger=csv).
    node = {"csv": {"_target_": f"{CSVLogger.__module__}.CSVLogger"}, "mlflow": {"tags": {}}}
    with caplog.at_level(logging.WARNING):
        (built,) = build_loggers(node, tmp_path)
    assert isinstance(built, CSVLogger) and built.folder == tmp_path / "csv"
    assert "logger.mlflow has settings but logger=mlflow is not chosen" in caplog.text
    assert build_loggers({}, tmp_path) == []


def test_hyperparameters_use_option_names_and_the_resolved_precision():
    cfg, hydra = _compose_with_hydra(
        ["experiment=demo", "loss=bce", "optimizer.lr=0.002", "logger=[csv,mlflow]"]
    )
    hparams = run_hyperparameters(resolved(cfg), "bf16", hydra)
    assert hparams.choices["loss"] == "bce"
    assert hparams.choices["backbone"] == "resnet10t" and hparams.choices["experiment"] == "demo"
    assert hparams.values["optimizer.lr"] == 0.002 and hparams.values["trainer.epochs"] == 3
    assert hparams.values["trainer.precision"] == "bf16"  # what the run uses, not "auto"
    flat = hparams.flat()
    assert not any("logger" in key or "hydra" in key for key in flat)
    assert not any("_target_" in key or "q2l." in str(value) for key, value in flat.items())


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, digits_root):
    """One tiny run logged to CSV, MLflow (SQLite) and W&B (offline) for one epoch, then resumed
    for a second: (run directory, tracking URI, the two W&B offline run files)."""
    base = tmp_path_factory.mktemp("logged")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    overrides = [
        *(o for o in tiny_overrides(digits_root, base / "cache") if not o.startswith("logger.")),
        "logger=[csv,mlflow,wandb]",
        f"logger.mlflow.tracking_uri={uri}",
        "trainer.log_every_n_steps=1",
        "trainer.epochs=1",
    ]
    run_dir = base / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            patch.setenv(variable, str(base / "wandb-home"))
        cfg, hydra = _compose_with_hydra(overrides)
        assert train(cfg, run_dir, hydra=hydra)["status"] == "completed"
        first_ids = json.loads((run_dir / RUNS_FILE).read_text())
        # More epochs for the finished run: a resume (allow_config_change for trainer.epochs).
        cfg, hydra = _compose_with_hydra(
            [*overrides[:-1], "trainer.epochs=2", "allow_config_change=true"]
        )
        assert train(cfg, run_dir, hydra=hydra)["status"] == "completed"
    assert json.loads((run_dir / RUNS_FILE).read_text()) == first_ids
    wandb_files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    return run_dir, uri, wandb_files


@pytest.mark.slow
def test_mlflow_holds_option_names_and_every_epoch_in_one_resumed_run(logged_run):
    from mlflow.tracking import MlflowClient

    run_dir, uri, _ = logged_run
    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "q2l"]
    (run,) = client.search_runs([experiment.experiment_id])  # the resume added no second run
    assert run.info.run_id == json.loads((run_dir / RUNS_FILE).read_text())["mlflow"]["run_id"]
    assert run.info.status == "FINISHED" and run.data.tags["q2l.status"] == "completed"
    params = run.data.params
    assert params["loss"] == "asl" and params["backbone"] == "resnet10t"
    assert params["model"] == "q2l_small" and params["experiment"] == "demo"
    precision = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["precision"]
    assert params["trainer.precision"] == precision != "auto"
    assert not any("_target_" in key or "q2l." in value for key, value in params.items())
    # MLflow keeps a param's first value; the change on resume is named in the run's log.
    assert params["trainer.epochs"] == "1"
    assert "MLflow keeps a param's first value" in (run_dir / "train.log").read_text()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(run.info.run_id, "val_raw/mAP")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["mAP"]) for r in lines]
    ema = client.get_metric_history(run.info.run_id, "val_ema/mAP")
    assert [m.value for m in ema] == pytest.approx([r["mAP_ema"] for r in lines])
    assert len(client.get_metric_history(run.info.run_id, "train/step/loss")) == 8  # 2 x 4 steps
    assert run.data.metrics["best/mAP"] == pytest.approx(max(r["mAP_best"] for r in lines))


@pytest.mark.slow
def test_mlflow_run_status_follows_the_outcome_and_a_restart_reopens_it(logged_run, tmp_path):
    from mlflow.tracking import MlflowClient

    from q2l.training.loggers import RunOutcome
    from q2l.training.loggers.mlflow import MLflowLogger

    uri = logged_run[1]  # the store exists: no second schema migration
    client = MlflowClient(tracking_uri=uri)

    def run_once(outcome):
        logger = MLflowLogger(tmp_path, tracking_uri=uri, experiment_name="statuses")
        logger.start(Hyperparameters({"loss": "bce"}, {"seed": 0}), history=[])
        logger.finish(outcome)
        return logger.run_id, client.get_run(logger.run_id).info.status

    failed_id, failed = run_once(None)
    preempted_id, preempted = run_once(RunOutcome.from_summary({"status": "preempted"}))
    done_id, done = run_once(RunOutcome.from_summary({"status": "early_stopped"}))
    assert (failed, preempted, done) == ("FAILED", "KILLED", "FINISHED")
    assert failed_id == preempted_id == done_id  # one run directory, one MLflow run
    assert client.get_run(done_id).data.params == {"loss": "bce", "seed": "0"}


@pytest.mark.slow
def test_wandb_offline_run_holds_the_same_and_its_resume_keeps_the_run_id(logged_run):
    run_dir, _, wandb_files = logged_run
    first, resumed = (read_offline_run(path) for path in wandb_files)
    run_id = json.loads((run_dir / RUNS_FILE).read_text())["wandb"]["run_id"]
    assert first.run_id == resumed.run_id == run_id and first.name == run_dir.name
    assert first.config["loss"] == "asl" and first.config["backbone"] == "resnet10t"
    assert first.config["trainer.epochs"] == 1 and resumed.config["trainer.epochs"] == 2
    epochs = [row for run in (first, resumed) for row in run.history if "val_raw/mAP" in row]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(row["epoch"], row["step"], row["val_raw/mAP"]) for row in epochs] == [
        (r["epoch"], r["step"], pytest.approx(r["mAP"])) for r in lines
    ]
    assert epochs[0]["val_ema/mAP"] == pytest.approx(lines[0]["mAP_ema"])
    assert resumed.summary["status"] == "completed" and resumed.summary["best/epoch"] >= 1


@pytest.mark.slow
def test_csv_files_hold_the_history_hyperparameters_and_summary(logged_run):
    folder = logged_run[0] / "csv"
    with (folder / "epochs.csv").open() as handle:
        epochs = list(csv.DictReader(handle))
    assert [row["epoch"] for row in epochs] == ["1", "2"]  # the resumed run's whole history
    assert {"train/loss", "val_raw/mAP", "val_ema/mAP", "val_best/mAP"} <= set(epochs[0])
    with (folder / "steps.csv").open() as handle:
        assert [row["step"] for row in csv.DictReader(handle)] == [str(s) for s in range(1, 9)]
    with (folder / "hparams.csv").open() as handle:
        hparams = {row["key"]: row["value"] for row in csv.DictReader(handle)}
    assert hparams["loss"] == "asl" and hparams["trainer.epochs"] == "2"
    with (folder / "summary.csv").open() as handle:
        summary = {row["key"]: row["value"] for row in csv.DictReader(handle)}
    assert summary["status"] == "completed" and summary["final/epoch"] == "2"


def test_a_missing_logger_package_is_named_before_any_data_is_read(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed
    nowhere = tmp_path / "nowhere"
    cfg = tiny_cfg("logger=[tensorboard,mlflow]", f"dataset.root={nowhere}")
    with pytest.raises(ConfigValueError, match=r"logger=mlflow .* pip install 'q2l\[mlflow\]'"):
        train(cfg, tmp_path / "run")
    assert not nowhere.exists()  # the demo's data builder never ran, nothing was read


class _Broken(RunLogger):
    name = "broken"

    def __init__(self) -> None:
        self.finished_with = "never"

    def start(self, hparams, history) -> None:
        pass

    def log_step(self, step, loss, lr) -> None:
        pass

    def log_epoch(self, record) -> None:
        raise ConnectionError("tracking server unreachable")

    def finish(self, outcome) -> None:
        self.finished_with = outcome


def test_a_logger_failing_mid_run_is_dropped_and_the_others_go_on(tmp_path, caplog):
    broken = _Broken()
    loggers = [broken, CSVLogger(tmp_path)]
    run_log = RunLog(tmp_path, loggers=loggers, hparams=Hyperparameters({}, {}))
    with caplog.at_level(logging.WARNING):
        for epoch in (1, 2):
            metrics = {"mAP": 50.0 + epoch, "mAP_voc": 51.0}
            run_log.log_epoch(EpochRecord(epoch, 4 * epoch, "mAP", raw=metrics))
    run_log.write_summary({"status": "completed", "best": {"epoch": 2, "mAP": 52.0}})
    run_log.close()
    assert "logger broken failed (ConnectionError: tracking server unreachable)" in caplog.text
    assert broken.finished_with is None  # ended as failed, once, when it broke
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert len((tmp_path / "csv" / "epochs.csv").read_text().splitlines()) == 3
    assert "completed" in (tmp_path / "csv" / "summary.csv").read_text()


def test_help_lists_the_loggers_and_names_their_keys_as_typed():
    from q2l.cli.help import command_help

    assert re.search(
        r"logger +\[tensorboard\] csv, mlflow, none, tensorboard, wandb", command_help("train")
    )
    keys = command_help("train", "logger=mlflow")
    assert "logger.mlflow.tracking_uri" in keys and "logger.mlflow.experiment_name" in keys
    assert "logger.tensorboard.max_classes" in command_help("train", "logger")


@pytest.mark.slow
def test_the_commands_start_without_wandb_until_its_logger_asks_for_it():
    """timm imports wandb when installed (about a second of every start); the commands defer it,
    and logger=wandb still finds the package."""
    pytest.importorskip("wandb")
    code = (
        "import sys\n"
        "import q2l.cli.train, q2l.training.run, timm\n"
        "assert sys.modules.get('wandb') is None, 'wandb imported at start'\n"
        "from q2l.training.loggers import check_packages\n"
        "check_packages({'wandb': {'_target_': 'q2l.training.loggers.wandb.WandbLogger'}})\n"
        "import wandb\n"
        "print(wandb.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "wandb"
