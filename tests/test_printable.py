"""File names that are not UTF-8: logged with their bytes escaped (console, pipe, train.log),
written exactly to JSONL and escaped to CSV; never a lost warning or a stopped command."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from q2l.inference.inputs import resolve_inputs
from q2l.utils.printable import PrintableFormatter, is_printable, printable

from .conftest import REPO_ROOT, tiny_overrides

BAD = os.fsdecode(b"bad\xff.jpg")  # a corrupt image: its warning names it
ODD = os.fsdecode(b"odd\xfe.jpg")  # a readable image: its row names it


@pytest.fixture
def odd_names(digits_root, tmp_path):
    """A folder with a readable image under an ASCII name, one under a name that is not UTF-8,
    and a corrupt file under another such name."""
    folder = tmp_path / "photos"
    folder.mkdir()
    source = next((digits_root / "val2014").glob("*.jpg"))
    shutil.copy(source, folder / "good.jpg")
    shutil.copy(source, folder / ODD)
    (folder / BAD).write_bytes(b"not an image")
    return folder


def test_printable_escapes_exactly_the_undecodable_bytes():
    assert printable(BAD) == "bad\\xff.jpg" and not is_printable(BAD)
    assert printable("déjà vu.jpg") == "déjà vu.jpg" and is_printable("déjà vu.jpg")
    assert printable("\ud800") == "\\ud800"  # a surrogate no file name decodes to
    record = logging.LogRecord("q2l", logging.WARNING, __file__, 1, "skip %s", (BAD,), None)
    assert PrintableFormatter("%(message)s").format(record).encode("utf-8") == b"skip bad\\xff.jpg"


def _run_strict(args: list[str], timeout: int = 300) -> tuple[int, str]:
    """`python *args` from the repository root with a strict UTF-8 stdout (PYTHONIOENCODING=utf-8,
    as under any UTF-8 locale but C.UTF-8) into a pipe; (exit code, stdout and stderr), which must
    themselves be valid UTF-8. A subprocess also keeps the odd names out of this test process's
    logs, which pytest-xdist could not send on (it refuses strings that are not UTF-8)."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        timeout=timeout,
    )
    output = done.stdout.decode("utf-8") + done.stderr.decode("utf-8")  # strict: valid UTF-8
    assert "Logging error" not in output
    return done.returncode, output


@pytest.mark.slow
def test_csv_escapes_a_name_and_the_log_survives_a_strict_pipe(
    tiny_checkpoint, odd_names, tmp_path
):
    output = tmp_path / "predictions.csv"
    command = ["predict.py", f"ckpt={tiny_checkpoint}", f"input={odd_names}", f"output={output}"]
    code, log = _run_strict([*command, "num_workers=0", "progress_bar=false"])
    assert code == 0, log
    assert f"skipping unreadable image: cannot read image {odd_names}/bad\\xff.jpg" in log
    assert "1 unreadable image(s) skipped" in log
    assert log.count("not valid UTF-8") == 1  # said once, naming the first such path
    rows = output.read_bytes().decode("utf-8").splitlines()
    assert [row.split(",")[0] for row in rows] == [
        "path",
        f"{odd_names}/good.jpg",
        f"{odd_names}/odd\\xfe.jpg",
    ]


@pytest.mark.slow
def test_jsonl_keeps_the_exact_name_and_a_list_reads_it(tiny_checkpoint, odd_names, tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_bytes(b"photos/odd\xfe.jpg\nphotos/good.jpg\nphotos/bad\xff.jpg\n")
    assert resolve_inputs(str(listing)) == [
        odd_names / ODD,
        odd_names / "good.jpg",
        odd_names / BAD,
    ]
    output = tmp_path / "predictions.jsonl"
    command = ["predict.py", f"ckpt={tiny_checkpoint}", f"input={listing}", f"output={output}"]
    code, log = _run_strict([*command, "num_workers=0", "progress_bar=false"])
    assert code == 0, log
    assert "scored 2 of 3 images" in log and f"skipped: {odd_names}/bad\\xff.jpg" in log
    text = output.read_bytes().decode("ascii")  # json's escapes: plain ASCII
    paths = [os.fsencode(json.loads(line)["path"]) for line in text.splitlines()]
    assert paths == [os.fsencode(odd_names / ODD), os.fsencode(odd_names / "good.jpg")]


@pytest.fixture
def digits_with_an_odd_name(digits_root, tmp_path):
    """The tiny digits data set plus a corrupt training image named `bad\\xff.jpg`, listed in
    the COCO annotations (JSON writes its name as "bad\\udcff.jpg")."""
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    (root / "train2014" / BAD).write_bytes(b"not an image")
    annotations = root / "annotations" / "instances_train2014.json"
    coco = json.loads(annotations.read_text())
    coco["images"].append({"id": 10**6, "file_name": BAD, "width": 32, "height": 32})
    annotations.write_text(json.dumps(coco))
    return root


@pytest.mark.slow
def test_train_log_and_console_name_a_bad_image_whose_name_is_not_utf8(
    digits_with_an_odd_name, tmp_path
):
    root, run = digits_with_an_odd_name, tmp_path / "run"
    overrides = [
        *tiny_overrides(root, tmp_path / "cache"),
        "~prepare.data",
        "dataset.on_bad_image=skip",
        "dataset.max_bad_fraction=0.1",
        "trainer.epochs=1",
        f"hydra.run.dir={run}",
    ]
    code, console = _run_strict(["train.py", *overrides])
    assert code == 0, console
    log = (run / "train.log").read_bytes().decode("utf-8")  # strict: the file is valid UTF-8
    for text in (console, log):
        assert f"{root}/train2014/bad\\xff.jpg" in text
        assert "unreadable image file(s) (tolerated" in text  # the data check's warning


@pytest.mark.slow
def test_validate_data_reports_the_name_on_a_strict_pipe(digits_with_an_odd_name, tmp_path):
    root = digits_with_an_odd_name
    command = ["-m", "q2l.cli.validate_data", "experiment=demo", f"dataset.root={root}"]
    code, output = _run_strict([*command, f"dataset.cache_dir={tmp_path / 'cache'}"])
    assert code == 1, output
    assert "PROBLEM: train: 1 unreadable image file(s)" in output
    assert f"{root}/train2014/bad\\xff.jpg: cannot identify image file" in output
