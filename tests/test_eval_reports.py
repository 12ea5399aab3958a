"""eval.py calibrate=f1 and the report files; predict and export use the calibrated thresholds."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from q2l.evaluation import reports
from q2l.evaluation.calibration import precision_recall_curve
from q2l.evaluation.evaluate import run
from q2l.inference.export import export
from q2l.inference.predict import predict
from q2l.metrics import average_precision
from q2l.utils.precision_recall_plot import CALIBRATED_MARKER, RUN_MARKER

from .test_calibration import _brute_force


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    """The tiny checkpoint in a folder of its own (hard link), so thresholds files stay here."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    os.link(tiny_checkpoint, folder / "best.pt")
    return folder / "best.pt"


def _evaluations(folder):
    return sorted(folder.glob("eval-best-*"))


def test_calibrate_writes_thresholds_and_every_report_file(compose_config, checkpoint, capsys):
    run(compose_config("eval", [f"ckpt={checkpoint}", "calibrate=f1", "save_scores=true"]))
    printed = capsys.readouterr().out
    assert "per-class" in printed and "F1*" in printed  # both metric columns, per-class table
    (folder,) = _evaluations(checkpoint.parent)
    assert sorted(p.name for p in folder.iterdir()) == [
        "eval.json",
        "per_class.csv",
        "pr_curves.png",
        "scores.npz",
    ]
    saved = np.load(folder / "scores.npz", allow_pickle=False)
    assert saved["scores"].shape == (32, 10) and len(saved["image_ids"]) == 32
    assert list(saved["class_names"])[:2] == ["zero", "one"]

    # The thresholds beside the checkpoint are the brute-force F1 maxima of those scores.
    record = json.loads((checkpoint.parent / "best.thresholds.json").read_text())
    expected, _ = _brute_force(
        torch.from_numpy(saved["scores"]).double(), torch.from_numpy(saved["targets"]), 0.5
    )
    assert record["thresholds"] == expected.tolist()
    assert record["rule_name"] == "f1" and "highest threshold" in record["rule"]
    assert record["split"] == {"dataset": "digits", "num_images": 32}
    assert record["classes"][0] == "zero" and record["checkpoint_step"] > 0

    result = json.loads((folder / "eval.json").read_text())
    assert result["calibrated"]["thresholds"]["zero"] == record["thresholds"][0]
    assert set(result["calibrated"]["metrics"]) == {"CP", "CR", "CF1", "OP", "OR", "OF1"}
    # F1-optimal per-class thresholds cannot lose to 0.5 on the split they were chosen on.
    per_class = result["per_class"]
    assert all(row["F1_calibrated"] >= row["F1"] - 1e-9 for row in per_class.values())
    with (folder / "per_class.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10 and float(rows[0]["threshold_calibrated"]) == pytest.approx(
        record["thresholds"][0], abs=1e-6
    )
    assert rows[0]["AP"] and int(rows[0]["positives"]) == per_class["zero"]["positives"]
    with Image.open(folder / "pr_curves.png") as picture:
        assert picture.width > 500 and picture.height > 150


def test_thresholds_are_never_overwritten_and_a_new_eval_reports_on_them(
    compose_config, checkpoint, capsys
):
    run(compose_config("eval", [f"ckpt={checkpoint}", "calibrate=f1"]))
    thresholds = checkpoint.parent / "best.thresholds.json"
    before = thresholds.read_text()
    with pytest.raises(FileExistsError, match="best.thresholds.json exists"):
        run(compose_config("eval", [f"ckpt={checkpoint}", "calibrate=f1"]))
    assert thresholds.read_text() == before and len(_evaluations(checkpoint.parent)) == 1
    (first,) = _evaluations(checkpoint.parent)
    run(compose_config("eval", [f"ckpt={checkpoint}"]))  # reports at the saved thresholds too
    (second,) = set(_evaluations(checkpoint.parent)) - {first}  # a new folder; the first is kept
    result = json.loads((second / "eval.json").read_text())
    assert result["calibrated"]["source"] == str(thresholds)
    missing = checkpoint.parent / "other.thresholds.json"
    with pytest.raises(FileNotFoundError, match="other.thresholds.json"):
        run(compose_config("eval", [f"ckpt={checkpoint}", f"thresholds_file={missing}"]))
    assert len(_evaluations(checkpoint.parent)) == 2


def test_predict_and_export_use_the_calibrated_thresholds(
    compose_config, checkpoint, digits_root, tmp_path
):
    run(compose_config("eval", [f"ckpt={checkpoint}", "calibrate=f1"]))
    record = json.loads((checkpoint.parent / "best.thresholds.json").read_text())
    thresholds = dict(zip(record["classes"], record["thresholds"], strict=True))
    images = digits_root / "val2014"
    options = ["num_workers=0", "progress_bar=false", f"input={images}"]
    calibrated = predict(
        compose_config(
            "predict", [f"ckpt={checkpoint}", f"output={tmp_path / 'a.jsonl'}", *options]
        )
    )
    assert "best.thresholds.json" in calibrated["thresholds"]
    plain = predict(
        compose_config(
            "predict",
            [f"ckpt={checkpoint}", "thresholds=run", f"output={tmp_path / 'b.jsonl'}", *options],
        )
    )
    assert "trainer.threshold=0.5" in plain["thresholds"]
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["labels"] == [n for n, s in row["scores"].items() if s >= thresholds[n]]
    plain_rows = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["labels"] for r in rows] != [r["labels"] for r in plain_rows]

    export(compose_config("export", [f"ckpt={checkpoint}", "format=safetensors"]))
    sidecar = json.loads((checkpoint.parent / "best.json").read_text())
    assert sidecar["thresholds"] == record["thresholds"]
    from_export = predict(
        compose_config(
            "predict",
            [
                f"model_file={checkpoint.with_suffix('.safetensors')}",
                f"output={tmp_path / 'c.jsonl'}",
                *options,
            ],
        )
    )
    assert "embedded in the model file" in from_export["thresholds"]
    export_rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["labels"] for r in export_rows] == [r["labels"] for r in rows]


def test_pr_curves_mark_each_classs_thresholds_on_its_curve(tmp_path):
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(200, 4, generator=generator) < 0.3).long()
    scores = (0.4 * targets + 0.6 * torch.rand(200, 4, generator=generator)).float()
    targets[:20, 1] = -1  # not annotated: left out of the curve and of the counts alike
    calibrated = torch.tensor([0.7, 0.3, 0.8, 0.45], dtype=torch.float64)
    names = ["cat", "dog", "car", "tree"]
    path = tmp_path / "pr_curves.png"
    ap = average_precision(scores, targets)
    figure = reports.write_pr_curves(path, scores, targets, names, ap, 0.5, calibrated)
    assert [panel.name for panel in figure.panels] == names
    run_points = reports.operating_points(scores, targets, 0.5)
    calibrated_points = reports.operating_points(scores, targets, calibrated)
    with Image.open(path) as picture:
        assert picture.size == figure.size
        for k in range(4):
            panel = figure.panels[k]
            assert (panel.run_point, panel.calibrated_point) == (
                run_points[k],
                calibrated_points[k],
            )
            precision, recall = precision_recall_curve(scores[:, k], targets[:, k])
            vertices = set(zip(recall.tolist(), precision.tolist(), strict=True))
            for point, colour in (
                (run_points[k], RUN_MARKER),
                (calibrated_points[k], CALIBRATED_MARKER),
            ):
                assert point.threshold in (0.5, float(calibrated[k]))
                assert (point.recall, point.precision) in vertices  # a vertex of the curve
                pixel = picture.getpixel(figure.point(k, point.recall, point.precision))
                assert max(abs(a - b) for a, b in zip(pixel, colour, strict=True)) <= 12, (k, pixel)
