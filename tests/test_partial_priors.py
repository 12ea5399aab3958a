"""Partial-label ASL's class priors: the warning about online priors, priors files, their order."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from q2l.losses import PartialAsymmetricLoss, read_class_priors
from q2l.training.run import train


def _targets(batch: int = 8, classes: int = 4) -> torch.Tensor:
    targets = -torch.ones(batch, classes)  # mostly unannotated, a few known labels
    targets[:, 0] = 1
    targets[::2, 1] = 0
    return targets


def test_online_priors_warn_once_that_selective_ignores_most(caplog):
    loss = PartialAsymmetricLoss(mode="selective", likelihood_topk=1).train()
    with caplog.at_level(logging.WARNING, logger="q2l.losses"):
        for _ in range(4):  # untrained logits: every class's prior is about 0.5 > 0.05
            loss(torch.zeros(8, 4), _targets())
    warnings = [r for r in caplog.records if "selective acts like mode=ignore" in r.message]
    assert len(warnings) == 1 and "class_priors_file" in warnings[0].message


def test_fixed_priors_do_not_warn(caplog, tmp_path):
    (tmp_path / "priors.json").write_text(json.dumps([0.01, 0.9, 0.01, 0.02]))
    loss = PartialAsymmetricLoss(mode="selective", class_priors_file=str(tmp_path / "priors.json"))
    with caplog.at_level(logging.WARNING, logger="q2l.losses"):
        loss.train()(torch.zeros(8, 4), _targets())
    assert not caplog.records
    torch.testing.assert_close(loss.class_priors, torch.tensor([0.01, 0.9, 0.01, 0.02]))


@pytest.mark.parametrize(
    ("name", "text", "names"),
    [
        # PartialLabelingCSL's ComputePrior output
        ("train_avg_preds.csv", "Classes,avg_pred\nb,0.2\na,0.1\nc,0.3\n", ["b", "a", "c"]),
        ("priors.csv", "0.2\n0.1\n0.3\n", None),
        ("named.csv", "b,0.2\na,0.1\nc,0.3\n", ["b", "a", "c"]),
        ("priors.json", json.dumps({"b": 0.2, "a": 0.1, "c": 0.3}), ["b", "a", "c"]),
        ("list.json", json.dumps([0.2, 0.1, 0.3]), None),
    ],
)
def test_priors_file_layouts(tmp_path, name, text, names):
    (tmp_path / name).write_text(text)
    assert read_class_priors(tmp_path / name) == (names, [0.2, 0.1, 0.3])


def test_named_priors_follow_the_data_sets_order(tmp_path):
    (tmp_path / "p.csv").write_text("Classes,avg_pred\nb,0.2\na,0.1\nc,0.3\n")
    loss = PartialAsymmetricLoss(mode="selective", class_priors_file=str(tmp_path / "p.csv"))
    loss.align_priors(["a", "b", "c"])
    torch.testing.assert_close(loss.class_priors, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"missing \['d'\]"):
        loss.align_priors(["a", "b", "d"])


def test_bad_priors_files_are_refused(tmp_path):
    (tmp_path / "bad.csv").write_text("Classes,score\na,0.1\n")
    with pytest.raises(ValueError, match="not a list of class priors"):
        read_class_priors(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="class_priors_file"):
        PartialAsymmetricLoss(class_priors_file=str(tmp_path / "none.csv"))
    (tmp_path / "p.json").write_text("[0.1]")
    with pytest.raises(ValueError, match="not both"):
        PartialAsymmetricLoss(class_priors=[0.1], class_priors_file=str(tmp_path / "p.json"))


@pytest.mark.slow
def test_training_uses_a_named_priors_file(tiny_cfg, tmp_path):
    names = ["nine", "eight", "seven", "six", "five", "four", "three", "two", "one", "zero"]
    (tmp_path / "priors.json").write_text(
        json.dumps({n: 0.01 * (i + 1) for i, n in enumerate(names)})
    )
    summary = train(
        tiny_cfg(
            "trainer.epochs=1",
            "loss=partial_asl",
            "loss.mode=selective",
            f"loss.class_priors_file={tmp_path / 'priors.json'}",
            "dataset.partial.keep_ratio=0.5",
        ),
        tmp_path / "run",
    )
    assert summary["status"] == "completed"
    from q2l.training.checkpoint import load_checkpoint

    priors = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["loss"]["class_priors"]
    torch.testing.assert_close(priors, torch.tensor([0.01 * (10 - k) for k in range(10)]))
