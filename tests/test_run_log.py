"""TensorBoard beyond scalars: per-class AP and PR curves, a labelled image grid, hparams."""

from __future__ import annotations

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from q2l.training.loggers import Hyperparameters, RunOutcome
from q2l.training.loggers.tensorboard import TensorBoardLogger
from q2l.training.records import EpochRecord


def _events(folder):
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    return events


class _Images:
    def __init__(self, paths):
        self.image_paths = paths


def test_validation_view_and_hparams(tmp_path, digits_root):
    names = ["zero", "one", "two"]
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(12, 3, generator=generator)
    targets = (torch.rand(12, 3, generator=generator) < 0.5).float()
    targets[:, 2] = 0  # no positive: no AP, no curve
    paths = sorted((digits_root / "val2014").glob("*.jpg"))[:12]
    logger = TensorBoardLogger(tmp_path)
    hparams = Hyperparameters(
        choices={"experiment": "demo", "loss": "asl"},
        values={"optimizer.lr": 0.001, "trainer.precision": "bf16"},
    )
    logger.start(hparams, history=[])
    logger.log_epoch(EpochRecord(1, 7, "mAP", raw={"mAP": 70.0}, ema={"mAP": 71.0}))
    logger.log_validation(7, scores, targets, names, 0.5, _Images(paths))
    logger.finish(RunOutcome.from_summary({"best": {"epoch": 1, "mAP": 81.5}}))

    events = _events(tmp_path / "tensorboard")
    tags = events.Tags()
    assert {"val_class_AP/zero", "val_class_AP/one", "hparams/best_mAP"} <= set(tags["scalars"])
    assert {"val_raw/mAP", "val_ema/mAP", "val_best/mAP"} <= set(tags["scalars"])
    assert "val_class_AP/two" not in tags["scalars"]
    assert events.Scalars("val_class_AP/zero")[0].step == 7
    assert set(events.PluginTagToContent("pr_curves")) == {"val_pr/zero", "val_pr/one"}
    assert "val/predictions" in tags["images"]
    (image,) = events.Images("val/predictions")
    assert image.width > 300 and image.height > 150  # 8 captioned images in a grid
    shown = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(shown)
    assert b"loss" in shown["_hparams_/session_start_info"]  # the option, under its group


def test_a_run_that_starts_logging_on_resume_gets_its_history(tmp_path):
    history = [EpochRecord(e, 4 * e, "mAP", raw={"mAP": 50.0 + e}) for e in (1, 2)]
    logger = TensorBoardLogger(tmp_path)
    logger.start(Hyperparameters({}, {}), history)
    logger.finish(None)
    assert [e.step for e in _events(tmp_path / "tensorboard").Scalars("val_raw/mAP")] == [4, 8]


def test_training_writes_the_per_class_view_every_epoch(tiny_checkpoint):
    events = _events(tiny_checkpoint.parent.parent / "tensorboard")
    assert "val_class_AP/zero" in events.Tags()["scalars"]
    assert "val/predictions" in events.Tags()["images"]
    assert len(events.PluginTagToContent("pr_curves")) >= 1
    assert events.PluginTagToContent("hparams")  # the key settings and the best mAP
