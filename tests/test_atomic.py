"""Files q2l writes follow the user's umask, like any other program's: atomic writes (checkpoints,
metrics.json, label caches), exports and predictions."""

from __future__ import annotations

import os
import stat

import pytest

from q2l.inference.export import export
from q2l.inference.predict import predict
from q2l.training.run import train
from q2l.training.rundir import LOCK_NAME, RunDirectory
from q2l.utils.atomic import atomic_write, current_umask, file_mode


@pytest.fixture
def umask(request):
    """Run the test under the umask it is parametrized with; the previous one restored after."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _modes(paths) -> dict[str, str]:
    """{path: octal mode}: a failure shows every file whose mode is wrong."""
    return {str(path): oct(_mode(path)) for path in paths}


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], indirect=True, ids=oct)
def test_atomic_write_gives_the_mode_of_open(tmp_path, umask):
    assert current_umask() == umask and file_mode() == 0o666 & ~umask
    with atomic_write(tmp_path / "new" / "file.json", "w") as handle:
        handle.write("{}")
    with open(tmp_path / "plain", "w"):
        pass
    assert _mode(tmp_path / "new" / "file.json") == _mode(tmp_path / "plain") == 0o666 & ~umask
    assert _mode(tmp_path / "new") == 0o777 & ~umask
    # The run lock too: with umask 002 a group member can take it to resume a shared run.
    with RunDirectory(tmp_path / "run"):
        assert _mode(tmp_path / "run" / LOCK_NAME) == 0o666 & ~umask


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True, ids=oct)
def test_a_runs_files_an_export_and_predictions_follow_the_umask(
    tiny_cfg, compose_config, digits_root, tmp_path, umask
):
    run = tmp_path / "run"
    train(tiny_cfg("trainer.epochs=1", "trainer.precision=fp32"), run)
    best = run / "checkpoints" / "best.pt"
    exported = tmp_path / "out" / "model.safetensors"  # safetensors itself creates files 0600
    export(compose_config("export", [f"ckpt={best}", "format=safetensors", f"output={exported}"]))
    predictions = tmp_path / "out" / "predictions.csv"
    image = next((digits_root / "val2014").glob("*.jpg"))
    predict(
        compose_config(
            "predict",
            [f"ckpt={best}", f"input={image}", f"output={predictions}", "progress_bar=false"],
        )
    )
    files = [
        run / "checkpoints" / "last.pt",
        best,
        run / "metrics.json",
        run / "metrics.jsonl",
        run / "train.log",
        run / ".q2l.lock",
        *(tmp_path / "cache").glob("*.npz"),  # the COCO label caches
        exported,
        exported.with_suffix(".json"),
        predictions,
    ]
    assert len(files) == 11
    assert _modes(files) == dict.fromkeys(map(str, files), oct(0o666 & ~umask))
    folders = [run / "checkpoints", tmp_path / "cache", tmp_path / "out"]
    assert _modes(folders) == dict.fromkeys(map(str, folders), oct(0o777 & ~umask))
