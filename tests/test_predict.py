"""q2l-predict: folders, globs and lists; unreadable images skipped and reported; the same scores
from the checkpoint and its ONNX export; outputs never overwritten."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from q2l.inference.predict import predict

from .conftest import run_python
from .helpers.images import write_huge_png


@pytest.fixture(scope="module")
def photos(digits_root, tmp_path_factory):
    """Six val images in nested folders, one corrupt JPEG, and a file that is no image."""
    folder = tmp_path_factory.mktemp("photos")
    sources = sorted((digits_root / "val2014").glob("*.jpg"))[:6]
    for index, source in enumerate(sources):
        target = folder / ("nested" if index % 2 else ".") / source.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(source, target)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _run(compose_config, *overrides):
    return predict(compose_config("predict", [*overrides, "num_workers=0", "progress_bar=false"]))


def _rows(path):
    return {row["path"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_a_corrupt_image_is_reported_and_skipped_the_others_scored(
    compose_config, tiny_checkpoint, photos, tmp_path, caplog
):
    output = tmp_path / "predictions.jsonl"
    summary = _run(compose_config, f"ckpt={tiny_checkpoint}", f"input={photos}", f"output={output}")
    assert summary["num_images"] == 7 and summary["num_scored"] == 6
    assert [path for path, _ in summary["skipped"]] == [str(photos / "broken.jpg")]
    assert "broken.jpg" in caplog.text and "1 unreadable image(s) skipped" in caplog.text
    rows = _rows(output)
    assert len(rows) == 6 and str(photos / "nested") in "".join(rows)
    row = next(iter(rows.values()))
    assert len(row["scores"]) == 10
    assert row["labels"] == [name for name, score in row["scores"].items() if score >= 0.5]
    assert "trainer.threshold=0.5" in summary["thresholds"]


def test_onnx_export_predicts_the_checkpoints_scores(
    compose_config, tiny_checkpoint, exports, photos, tmp_path
):
    from_checkpoint, from_onnx = tmp_path / "ckpt.jsonl", tmp_path / "onnx.jsonl"
    _run(compose_config, f"ckpt={tiny_checkpoint}", f"input={photos}", f"output={from_checkpoint}")
    _run(
        compose_config, f"model_file={exports['onnx'][0]}", f"input={photos}", f"output={from_onnx}"
    )
    expected, found = _rows(from_checkpoint), _rows(from_onnx)
    assert expected.keys() == found.keys()
    for path, row in expected.items():
        difference = max(abs(row["scores"][k] - found[path]["scores"][k]) for k in row["scores"])
        assert difference <= 1e-4, path


def test_csv_from_a_list_and_a_glob(compose_config, tiny_checkpoint, photos, tmp_path):
    listing = tmp_path / "images.txt"
    names = sorted(p.name for p in photos.glob("*.jpg") if p.name != "broken.jpg")
    listing.write_text("# my images\n" + "\n".join(str(photos / n) for n in names) + "\n\n")
    output = tmp_path / "predictions.csv"
    summary = _run(
        compose_config, f"ckpt={tiny_checkpoint}", f"input={listing}", f"output={output}"
    )
    with output.open() as handle:
        table = list(csv.reader(handle))
    assert table[0][:3] == ["path", "labels", "zero"] and len(table[0]) == 12
    assert len(table) == 1 + len(names) == 1 + summary["num_scored"]
    pattern = _run(
        compose_config,
        f"ckpt={tiny_checkpoint}",
        f"input={photos}/**/*.jpg",
        f"output={tmp_path / 'glob.jsonl'}",
    )
    assert pattern["num_images"] == 7 and pattern["num_scored"] == 6


def test_bad_requests_are_refused_before_work_naming_the_culprit(
    compose_config, tiny_checkpoint, photos, tmp_path
):
    taken = tmp_path / "taken.jsonl"
    taken.write_text("earlier results\n")
    cases = [
        ([f"ckpt={tiny_checkpoint}", f"input={photos}", f"output={taken}"], "taken.jsonl exists"),
        ([f"ckpt={tiny_checkpoint}", f"input={photos}", f"output={tmp_path / 'p.xlsx'}"], "p.xlsx"),
        (
            [
                f"ckpt={tiny_checkpoint}",
                f"input={tmp_path / 'nowhere'}",
                f"output={tmp_path / 'a.csv'}",
            ],
            "nowhere",
        ),
        (
            [f"ckpt={tmp_path / 'missing.pt'}", f"input={photos}", f"output={tmp_path / 'b.csv'}"],
            "missing.pt",
        ),
        ([f"input={photos}", f"output={tmp_path / 'c.csv'}"], "ckpt=PATH"),
    ]
    for overrides, culprit in cases:
        with pytest.raises(Exception, match=culprit.replace(".", r"\.")):
            _run(compose_config, *overrides)
    assert taken.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.jsonl"]


@pytest.mark.slow
def test_the_command_line_logs_periodic_progress_lines_when_not_a_terminal(
    tiny_checkpoint, photos, tmp_path, cli_env
):
    output = tmp_path / "cli.jsonl"
    command = [
        "predict.py",
        f"ckpt={tiny_checkpoint}",
        f"input={photos}",
        f"output={output}",
        "num_workers=0",
        "batch_size=4",
    ]
    environment = {**cli_env, "Q2L_PROGRESS_INTERVAL": "0"}  # a line per batch
    done = run_python(command, environment)
    assert done.returncode == 0, done.stderr
    assert "predict 1/2 (50%)" in done.stdout and "predict done: 2 in" in done.stdout
    assert "\r" not in done.stderr  # no tqdm bar in a log file
    assert len(output.read_text().splitlines()) == 6


@pytest.mark.slow
def test_the_command_line_takes_model_as_the_export_file(exports, photos, tmp_path, cli_env):
    # `model` is also the head's config group; predict reads model=PATH as model_file=PATH.
    output = tmp_path / "onnx.csv"
    command = ["predict.py", f"model={exports['onnx'][0]}", f"input={photos}"]
    done = run_python([*command, f"output={output}", "num_workers=0"], cli_env)
    assert done.returncode == 0, done.stderr
    assert len(output.read_text().splitlines()) == 1 + 6  # header and the six readable images


def test_an_image_over_max_image_pixels_is_skipped_unread(
    compose_config, tiny_checkpoint, digits_root, tmp_path
):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(next((digits_root / "val2014").glob("*.jpg")), folder / "small.jpg")
    write_huge_png(folder / "huge.png", 12000, 12000)
    output = tmp_path / "predictions.jsonl"
    summary = _run(compose_config, f"ckpt={tiny_checkpoint}", f"input={folder}", f"output={output}")
    assert summary["num_scored"] == 1 and list(_rows(output)) == [str(folder / "small.jpg")]
    [(path, reason)] = summary["skipped"]
    assert path == str(folder / "huge.png") and "12000 x 12000" in reason
    assert "more than max_image_pixels=89478485" in reason
