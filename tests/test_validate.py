"""Data validation (function, CLI, check at train start) and bad images during training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import q2l.training.run as train_module
from q2l.cli.validate_data import main
from q2l.data.dataset import BadImageError, MultiLabelImageDataset
from q2l.data.loader import build_loader
from q2l.data.table import TableMultiLabel
from q2l.data.transforms import build_eval_transform
from q2l.data.validate import DataValidationError, validate_splits
from q2l.training.run import train

from .conftest import SENTINEL, fail_if_called
from .helpers.images import write_huge_png


def _table(root: Path, rows: list[tuple[str, str]], name: str = "train.csv") -> Path:
    """A table of `rows` (file name, labels) with a small noisy JPEG for every file name."""
    root.mkdir(parents=True, exist_ok=True)
    for index, (file_name, _) in enumerate(rows):
        pixels = np.random.default_rng(index).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / file_name, quality=95)
    (root / name).write_text("image,labels\n" + "".join(f"{f},{labels}\n" for f, labels in rows))
    return root / name


def _pair(root: Path, train_rows, val_rows):
    _table(root, train_rows), _table(root, val_rows, "val.csv")
    split = {"image_root": root, "train_file": root / "train.csv", "val_file": root / "val.csv"}
    return TableMultiLabel(**split), TableMultiLabel(split="val", **split)


TRAIN_ROWS = [("a.jpg", "cat"), ("b.jpg", "dog"), ("c.jpg", "cat|dog"), ("d.jpg", "dog")]
VAL_ROWS = [("e.jpg", "cat"), ("f.jpg", "dog|cat")]


def _truncate(path: Path) -> None:
    """Cut the compressed scan short; the header (what a quick check reads) stays whole."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def test_quick_checks_headers_and_full_decodes(tmp_path):
    train, val = _pair(tmp_path, TRAIN_ROWS, VAL_ROWS)
    _truncate(tmp_path / "b.jpg")  # header intact, scan data cut: only a full decode notices
    report = validate_splits(train, val, level="quick")
    assert report.counts()["train_images"] == 4 and report.counts()["train_positives"] == 5
    with pytest.raises(DataValidationError, match="b.jpg"):
        validate_splits(train, val, level="full")


def test_duplicates_and_classes_without_positives(tmp_path):
    train, val = _pair(tmp_path, [*TRAIN_ROWS, ("a.jpg", "cat")], [("e.jpg", "cat")])
    with pytest.raises(DataValidationError) as error:
        validate_splits(train, val)
    assert "listed more than once: a.jpg" in str(error.value)
    warnings = error.value.report.warnings
    assert any("val: 1 class(es) without a positive" in w and "dog" in w for w in warnings)


def test_bad_files_are_warnings_within_the_skip_tolerance(tmp_path):
    train, val = _pair(tmp_path, TRAIN_ROWS, VAL_ROWS)
    (tmp_path / "a.jpg").unlink()
    report = validate_splits(train, val, bad_image_tolerance=0.25)
    assert report.counts()["train_missing"] == 1 and "tolerated" in report.warnings[0]
    with pytest.raises(DataValidationError, match="missing"):
        validate_splits(train, val, bad_image_tolerance=0.2)


def test_splits_with_other_classes_are_refused(tmp_path):
    train, _ = _pair(tmp_path, TRAIN_ROWS, VAL_ROWS)
    other = MultiLabelImageDataset([tmp_path / "e.jpg"], np.ones((1, 2), np.int8), ["dog", "cat"])
    with pytest.raises(DataValidationError, match="same names, other order"):
        validate_splits(train, other)


def test_cli_prints_the_report_and_exits_by_outcome(tmp_path, capsys):
    _table(tmp_path, TRAIN_ROWS + VAL_ROWS)
    overrides = ["dataset=table", f"dataset.root={tmp_path}", "dataset.val_fraction=0.34"]
    assert main(overrides) == 0
    output = capsys.readouterr().out
    assert "no problems found" in output and "train" in output and "positives" in output
    (tmp_path / "c.jpg").write_text("")  # zero bytes
    assert main(overrides) == 1
    assert "PROBLEM" in capsys.readouterr().out
    with (tmp_path / "train.csv").open("a") as table:
        table.write("../x.jpg,cat\n")
    assert main(overrides) == 1
    assert "escapes the image folder" in capsys.readouterr().out
    assert main(["dataset=table", "dataset.validate=sometimes"]) == 2


def test_training_stops_before_any_step_when_an_image_is_missing(tiny_cfg, digits_root, tmp_path):
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    victim = sorted((root / "train2014").iterdir())[3]
    victim.unlink()
    with pytest.raises(DataValidationError, match=victim.name):
        train(tiny_cfg(f"dataset.root={root}"), tmp_path / "run")
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))


def test_a_split_without_a_single_positive_label_is_a_problem(tmp_path, capsys):
    train, val = _pair(tmp_path, TRAIN_ROWS, VAL_ROWS)
    val.labels = np.zeros_like(val.labels)  # every image annotated as showing no class
    with pytest.raises(DataValidationError) as error:
        validate_splits(train, val)
    assert "val: not one positive label in its 2 images" in str(error.value)
    assert "train:" not in str(error.value)
    # Classes without positives stay warnings: here both of val's.
    assert any("val: 2 class(es) without a positive" in w for w in error.value.report.warnings)
    # The command line names it too (exit 1), with the table's rows all unlabelled.
    (tmp_path / "train.csv").write_text(
        "image,labels\n" + "".join(f"{f},\n" for f, _ in TRAIN_ROWS)
    )
    class_file = tmp_path / "classes.txt"
    class_file.write_text("cat\ndog\n")
    overrides = [
        f"dataset.root={tmp_path}",
        f"dataset.val_file={tmp_path / 'val.csv'}",
        f"dataset.class_file={class_file}",
    ]
    assert main(["dataset=table", *overrides]) == 1
    assert "PROBLEM: train: not one positive label in its 4 images" in capsys.readouterr().out


def test_an_image_over_the_pixel_limit_is_reported_unless_the_limit_allows_it(tmp_path, capsys):
    _table(tmp_path, TRAIN_ROWS + VAL_ROWS)
    write_huge_png(tmp_path / "c.jpg", 12000, 12000)  # Pillow reads the content, not the name
    overrides = ["dataset=table", f"dataset.root={tmp_path}", "dataset.val_fraction=0.34"]
    assert main(overrides) == 1
    output = capsys.readouterr().out
    assert "1 unreadable image file(s)" in output
    assert "c.jpg: image" in output and "is 12000 x 12000 = 144,000,000 pixels" in output
    assert "dataset.max_image_pixels=89478485" in output
    assert main([*overrides, "dataset.max_image_pixels=null"]) == 0  # the header check passes
    assert main([*overrides, "dataset.max_image_pixels=0"]) == 2  # and the value is checked


def _without_annotations(digits_root: Path, root: Path, split: str) -> Path:
    """A copy of the digits data set whose `split` annotation file lists its images but no
    object: every image of that split has no label."""
    shutil.copytree(digits_root, root)
    annotations = root / "annotations" / f"instances_{split}2014.json"
    coco = json.loads(annotations.read_text())
    annotations.write_text(json.dumps({**coco, "annotations": []}))
    return root


@pytest.mark.parametrize(("split", "validate"), [("train", "quick"), ("val", "off")])
def test_training_refuses_a_split_without_positives_before_the_model_is_built(
    tiny_cfg, digits_root, tmp_path, monkeypatch, split, validate
):
    root = _without_annotations(digits_root, tmp_path / "digits", split)
    fail_if_called(monkeypatch, train_module, "build_model", "model built")
    images = {"train": 64, "val": 32}[split]
    with pytest.raises(ValueError, match=f"{split}: not one positive label in its {images} images"):
        train(tiny_cfg(f"dataset.root={root}", f"dataset.validate={validate}"), tmp_path / "run")
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "annotation files" in metrics["error"]


@pytest.mark.parametrize("validate", ["quick", "off"])
def test_training_with_positives_in_both_splits_reaches_the_model_build(
    tiny_cfg, tmp_path, monkeypatch, validate
):
    """The positive control of the test above: its sentinel is on the path train() takes."""
    fail_if_called(monkeypatch, train_module, "build_model", "model built")
    with pytest.raises(SENTINEL, match="model built"):
        train(tiny_cfg(f"dataset.validate={validate}"), tmp_path / "run")


# ---- bad images while training (dataset.on_bad_image) ----


def _dataset(root: Path, **options) -> MultiLabelImageDataset:
    rows = [(f"{i}.jpg", "x") for i in range(8)]
    _table(root, rows)
    paths = [root / name for name, _ in rows]
    labels = np.eye(8, dtype=np.int8)  # target i identifies image i
    return MultiLabelImageDataset(
        paths,
        labels,
        [f"c{i}" for i in range(8)],
        build_eval_transform(16, (0.5,) * 3, (0.5,) * 3),
        **options,
    )


def test_error_policy_names_the_file_and_the_reason(tmp_path):
    dataset = _dataset(tmp_path)
    _truncate(tmp_path / "2.jpg")
    with pytest.raises(BadImageError, match=r"2\.jpg: .*(truncated|broken|image file)"):
        dataset[2]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_policy_substitutes_counts_across_workers_and_logs_once(tmp_path, num_workers, caplog):
    dataset = _dataset(tmp_path, on_bad_image="skip", max_bad_fraction=0.25)
    _truncate(tmp_path / "2.jpg")
    (tmp_path / "5.jpg").unlink()
    loader = build_loader(dataset, batch_size=4, train=False, num_workers=num_workers)
    for _ in range(2):  # two passes: each bad file is still counted (and logged) once
        targets = torch.cat([batch[1] for batch in loader])
    # Bad samples are replaced by the next readable one, deterministically.
    assert targets.argmax(1).tolist() == [0, 1, 3, 3, 4, 6, 6, 7]
    assert dataset.bad_images == 2
    if num_workers == 0:
        assert sum("skipping unreadable image" in r.message for r in caplog.records) == 2


def test_skip_policy_stops_above_max_bad_fraction(tmp_path):
    dataset = _dataset(tmp_path, on_bad_image="skip", max_bad_fraction=0.1)
    _truncate(tmp_path / "1.jpg")
    with pytest.raises(BadImageError, match="more than dataset.max_bad_fraction=0.1"):
        dataset[1]
