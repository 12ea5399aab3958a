"""TensorBoard beyond scalars: per-class AP and PR curves, a labelled image grid, hparams."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from q2l.training.run_log import RunLog, run_hparams


def _events(folder):
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    return events


class _Images:
    def __init__(self, paths):
        self.image_paths = paths


def test_validation_view_and_hparams(tmp_path, digits_root):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        OmegaConf.to_yaml({"backbone": {"name": "resnet18"}, "optimizer": {"lr": 0.001}, "seed": 0})
    )
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        OmegaConf.to_yaml(["experiment=demo", "loss.gamma_neg=2", "hydra.job.num=3"])
    )
    names = ["zero", "one", "two"]
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(12, 3, generator=generator)
    targets = (torch.rand(12, 3, generator=generator) < 0.5).float()
    targets[:, 2] = 0  # no positive: no AP, no curve
    paths = sorted((digits_root / "val2014").glob("*.jpg"))[:12]
    log = RunLog(run_dir)
    log.log_validation(7, scores, targets, names, 0.5, _Images(paths))
    log.close()
    log.write_summary({"best": {"mAP": 81.5}})

    events = _events(run_dir / "tensorboard")
    tags = events.Tags()
    assert {"val_class_AP/zero", "val_class_AP/one", "hparams/best_mAP"} <= set(tags["scalars"])
    assert "val_class_AP/two" not in tags["scalars"]
    assert events.Scalars("val_class_AP/zero")[0].step == 7
    assert set(events.PluginTagToContent("pr_curves")) == {"val_pr/zero", "val_pr/one"}
    assert "val/predictions" in tags["images"]
    (image,) = events.Images("val/predictions")
    assert image.width > 300 and image.height > 150  # 8 captioned images in a grid
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")

    assert run_hparams(run_dir) == {
        "backbone.name": "resnet18",
        "optimizer.lr": 0.001,
        "seed": 0,
        "experiment": "demo",
        "loss.gamma_neg": 2,
    }


def test_training_writes_the_per_class_view_every_epoch(tiny_checkpoint):
    events = _events(tiny_checkpoint.parent.parent / "tensorboard")
    assert "val_class_AP/zero" in events.Tags()["scalars"]
    assert "val/predictions" in events.Tags()["images"]
    assert len(events.PluginTagToContent("pr_curves")) >= 1
    assert events.PluginTagToContent("hparams")  # config.yaml's key settings and the best mAP


def test_a_resumed_history_from_older_q2l_gets_todays_top_k_names(tmp_path):
    """Before the literature's top-k convention, `*_top3` counted all three top classes: a resumed
    run's earlier epochs keep their numbers under the name that says so (`*_top3_all`)."""
    import json

    old = {"epoch": 1, "mAP": 80.0, "CP_top3": 61.9, "CP_top3_ema": 60.0}
    log = RunLog(tmp_path, history=[old])
    log.close()
    expected = {"epoch": 1, "mAP": 80.0, "CP_top3_all": 61.9, "CP_top3_all_ema": 60.0}
    assert log.history == [expected]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == expected
