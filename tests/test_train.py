"""End to end on a tiny generated data set: run directory, eval parity, resume, the CLI, sweeps."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from q2l.evaluation.evaluate import evaluate_checkpoint, format_report, output_dir, write_results
from q2l.training.checkpoint import load_checkpoint
from q2l.training.run import train

from .conftest import run_python, tiny_overrides

pytestmark = pytest.mark.slow  # every test here trains, reads a trained run or starts train.py


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digits_root):
    """One tiny 2-epoch training run shared by the tests that only read its outputs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from q2l.config import CONFIG_DIR

    base = tmp_path_factory.mktemp("run")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train", [*tiny_overrides(digits_root, base / "cache"), "trainer.log_every_n_steps=1"]
        )
    GlobalHydra.instance().clear()
    run_dir = base / "run"
    summary = train(cfg, run_dir)
    return run_dir, summary


def test_run_directory_holds_everything(trained_run):
    run_dir, summary = trained_run
    for relative in ["config.yaml", "metrics.json", "checkpoints/last.pt", "checkpoints/best.pt"]:
        assert (run_dir / relative).is_file(), relative
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    step_losses = [e.value for e in events.Scalars("train/step/loss")]
    assert [e.step for e in events.Scalars("train/step/loss")] == list(range(1, 9))  # 2 x 4 steps
    assert len(events.Scalars("train/step/lr")) == 8 and len(events.Scalars("val_raw/mAP")) == 2
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    # An epoch's train loss is the mean over its steps.
    assert lines[0]["train_loss"] == pytest.approx(sum(step_losses[:4]) / 4, rel=1e-5)
    for key in [
        "train_loss",
        "train_lr",
        "train_images_per_sec",
        "mAP",
        "mAP_ema",
        "mAP_voc",
        "CF1",
        "OF1_top3",
    ]:
        assert key in lines[0], key
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored["status"] == "completed" and stored["epochs_run"] == 2
    assert stored["best"]["mAP"] == pytest.approx(max(line["mAP_best"] for line in lines))
    assert summary["best"]["epoch"] == stored["best"]["epoch"]


def test_checkpoint_is_plain_and_complete(trained_run):
    run_dir, _ = trained_run
    payload = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    for key in [
        "model",
        "ema",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "step",
        "best_metric",
        "class_names",
        "config",
        "format_version",
    ]:
        assert key in payload, key
    assert payload["epoch"] == 2 and payload["class_names"][:3] == ["zero", "one", "two"]
    assert isinstance(payload["config"], dict)
    assert payload["config"]["backbone"]["name"] == "test_resnet"


def test_best_holds_what_evaluation_needs_and_last_what_resuming_needs(trained_run):
    run_dir, _ = trained_run
    best, last = run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / "last.pt"
    kept = torch.load(best, map_location="cpu", weights_only=True)
    assert {"model", "ema", "config", "class_names", "eval_weights", "metrics"} <= set(kept)
    assert not {"optimizer", "scheduler", "scaler", "rng", "progress"} & set(kept)
    assert best.stat().st_size < 0.7 * last.stat().st_size  # no optimizer state


def test_top_k_keeps_the_k_best_epochs(tiny_cfg, tmp_path):
    summary = train(tiny_cfg("trainer.epochs=4", "trainer.save_top_k=2"), tmp_path / "run")
    tops = sorted((tmp_path / "run" / "checkpoints").glob("top-*.pt"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    best_two = sorted(records, key=lambda r: (-r["mAP_best"], r["epoch"]))[:2]
    assert sorted(p.name.rsplit("epoch", 1)[1] for p in tops) == sorted(
        f"{r['epoch']:04d}.pt" for r in best_two
    )
    assert summary["best"]["epoch"] == best_two[0]["epoch"]


def test_eval_reproduces_training_map(trained_run, compose_config):
    run_dir, summary = trained_run
    best = run_dir / "checkpoints" / "best.pt"
    cfg = compose_config("eval", [f"ckpt={best}"])
    result = evaluate_checkpoint(cfg)
    assert result["metrics"]["mAP"] == pytest.approx(summary["best"]["mAP"], abs=1e-6)
    written = write_results(result, output_dir(cfg))
    assert written.parent.parent == best.parent and written.parent.name.startswith("eval-best-")
    assert json.loads(written.read_text())["metrics"]["mAP"] == pytest.approx(
        result["metrics"]["mAP"]
    )
    report = format_report(result)
    assert "mAP" in report and "nine" in report


def test_eval_refuses_data_with_other_classes(trained_run, compose_config, tmp_path):
    from q2l.demo.digits import build_digits_coco

    run_dir, _ = trained_run
    other = tmp_path / "other"
    build_digits_coco(other, num_train=20, num_val=10, canvas_size=32)
    annotation = other / "annotations" / "instances_val2014.json"
    data = json.loads(annotation.read_text())
    data["categories"][0]["name"] = "zebra"
    annotation.write_text(json.dumps(data))
    cfg = compose_config(
        "eval",
        [
            f"ckpt={run_dir / 'checkpoints' / 'best.pt'}",
            "dataset=coco2014",
            f"dataset.root={other}",
            f"dataset.cache_dir={tmp_path / 'cache'}",
            "dataset.image_size=32",
        ],
    )
    with pytest.raises(ValueError, match="zebra"):
        evaluate_checkpoint(cfg)


def test_resume_continues_where_it_stopped(tiny_cfg, tmp_path):
    first = tmp_path / "first"
    train(tiny_cfg("trainer.epochs=1"), first)
    last = first / "checkpoints" / "last.pt"
    resumed = tmp_path / "resumed"
    summary = train(
        tiny_cfg("trainer.epochs=2", f"resume={last}", "allow_config_change=true"), resumed
    )
    assert summary["epochs_run"] == 2
    lines = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]  # the history travels with the checkpoint
    before, after = load_checkpoint(last), load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert after["step"] == 2 * before["step"]
    assert after["scheduler"]["last_epoch"] == before["scheduler"]["last_epoch"] + before["step"]


def test_resume_refuses_another_model(tiny_cfg, tmp_path):
    train(tiny_cfg("trainer.epochs=1"), tmp_path / "a")
    with pytest.raises(ValueError, match="model.hidden_dim: 32 -> 16"):
        train(
            tiny_cfg("model.hidden_dim=16", f"resume={tmp_path / 'a' / 'checkpoints' / 'last.pt'}"),
            tmp_path / "b",
        )


def test_early_stopping(tiny_cfg, tmp_path):
    # lr 0 and frozen BatchNorm statistics can never improve on epoch 1, so patience 1 stops at
    # epoch 2 of 5. (With BatchNorm in train mode its running statistics still move and can.)
    summary = train(
        tiny_cfg(
            "trainer.epochs=5",
            "trainer.early_stop_patience=1",
            "optimizer.lr=0",
            "trainer.ema_decay=0",
            "backbone.frozen_bn=true",
        ),
        tmp_path / "run",
    )
    assert summary["status"] == "early_stopped" and summary["epochs_run"] == 2


def test_cli_bad_override_prints_hydras_message_and_creates_nothing(cli_env, tmp_path):
    """The command line shows what compose refuses (test_config has the other cases) and exits
    non-zero; nothing runs."""
    run_dir = tmp_path / "run"
    result = run_python(
        ["train.py", "dataset.root=/data/my_coco", f"hydra.run.dir={run_dir}"], cli_env
    )
    assert result.returncode != 0
    assert "You must specify 'dataset'" in result.stderr
    assert not run_dir.exists()


def test_cli_train_then_eval(cli_env, digits_root, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(digits_root, tmp_path / "cache")
    result = run_python(
        ["train.py", *overrides, "trainer.epochs=1", f"hydra.run.dir={run_dir}"], cli_env
    )
    assert result.returncode == 0, result.stderr
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert "best mAP" in (run_dir / "train.log").read_text()
    result = run_python(["eval.py", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}"], cli_env)
    assert result.returncode == 0, result.stderr
    trained = json.loads((run_dir / "metrics.json").read_text())["best"]["mAP"]
    [written] = (run_dir / "checkpoints").glob("eval-best-*/eval.json")
    evaluated = json.loads(written.read_text())["metrics"]["mAP"]
    assert evaluated == pytest.approx(trained, abs=1e-6)
    assert "nine" in result.stdout


def test_cli_sweep_survives_a_failing_job(cli_env, digits_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = tiny_overrides(digits_root, tmp_path / "cache")
    result = run_python(
        [
            "train.py",
            "-m",
            *overrides,
            "trainer.epochs=1",
            "optimizer.lr=1e-3,-1",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cli_env,
    )
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [row["optimizer.lr"] for row in rows] == ["0.001", "-1"]  # a column per swept key
    assert [row["status"] for row in rows] == ["completed", "failed"]
    assert float(rows[0]["best_mAP"]) > 0
    assert (sweep_dir / "summary.md").is_file()
    assert "optimizer.lr=-1.0: must be 0 or more" in rows[1]["error"]
    assert result.returncode != 0  # the sweep as a whole reports the failure
    assert result.stdout.count("sweep summary (") == 1  # once, after the last job
