"""The Python API (q2l.load, q2l.inference.classifier): predict.py's scores and labels from a
checkpoint or any export, every kind of input, unreadable images reported, thresholds chosen as
the command chooses them, a cheap `import q2l`, and the documented example run as printed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import q2l
from q2l.inference.model_info import read_thresholds, thresholds_path, write_thresholds
from q2l.inference.predict import predict

from .conftest import REPO_ROOT


@pytest.fixture(scope="module")
def photos(digits_root, tmp_path_factory):
    """Five val images, one in a subfolder, and a corrupt JPEG."""
    folder = tmp_path_factory.mktemp("api-photos")
    for index, source in enumerate(sorted((digits_root / "val2014").glob("*.jpg"))[:5]):
        target = folder / ("nested" if index == 3 else ".") / source.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(source, target)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return q2l.load(tiny_checkpoint, device="cpu")


def _command_rows(compose_config, output, *overrides):
    predict(
        compose_config(
            "predict", [*overrides, f"output={output}", "num_workers=0", "progress_bar=false"]
        )
    )
    return [json.loads(line) for line in output.read_text().splitlines()]


def _readable(predictions):
    return [prediction for prediction in predictions if not prediction.error]


@pytest.mark.slow
def test_import_q2l_loads_no_torch_until_the_api_is_used():
    code = "import sys, q2l; print('torch' in sys.modules, q2l.__version__); q2l.load; "
    code += "print('torch' in sys.modules)"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True
    )
    assert done.stdout.split() == ["False", q2l.__version__, "True"]
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        q2l.lod  # noqa: B018


def test_the_api_gives_the_commands_scores_and_labels(
    compose_config, model, tiny_checkpoint, photos, tmp_path, caplog
):
    rows = _command_rows(
        compose_config, tmp_path / "p.jsonl", f"ckpt={tiny_checkpoint}", f"input={photos}"
    )
    predictions = model.predict(photos)  # the command's batch size, 32: the same batch
    assert [p.path for p in predictions] == sorted(str(p) for p in photos.rglob("*.jpg"))
    (broken,) = [p for p in predictions if p.error]
    scored = [p for p in predictions if not p.error]
    assert broken.path == str(photos / "broken.jpg") and "broken.jpg" in broken.error
    assert broken.scores == {} and broken.labels == [] and "broken.jpg" in caplog.text
    assert [(p.path, p.scores, p.labels) for p in scored] == [
        (row["path"], row["scores"], row["labels"]) for row in rows
    ]
    assert all(p.error == "" and list(p.scores) == model.class_names for p in scored)
    assert model.class_names[:2] == ["zero", "one"] and model.image_size == 32
    assert model.thresholds == dict.fromkeys(model.class_names, 0.5)
    assert "trainer.threshold=0.5" in model.thresholds_note and "10 classes" in repr(model)


@pytest.mark.parametrize("fmt", ["onnx", "safetensors", "torchscript"])
def test_every_export_loads_with_its_record_and_scores_as_the_checkpoint(
    fmt, compose_config, model, exports, photos, tmp_path
):
    path = exports[fmt][0]
    exported = q2l.load(path, device="cpu")
    assert exported.class_names == model.class_names and exported.image_size == 32
    assert exported.thresholds == model.thresholds
    assert ("ONNX Runtime" if fmt == "onnx" else "fp32") in exported.description
    expected, found = _readable(model.predict(photos)), _readable(exported.predict(photos))
    for want, got in zip(expected, found, strict=True):
        assert got.path == want.path
        assert max(abs(got.scores[k] - want.scores[k]) for k in want.scores) <= 1e-4
    # The command reads the same export through `model_file=` and writes the API's rows.
    rows = _command_rows(
        compose_config, tmp_path / "e.jsonl", f"model_file={path}", f"input={photos}"
    )
    assert [(r["path"], r["scores"], r["labels"]) for r in rows] == [
        (p.path, p.scores, p.labels) for p in found
    ]
    with pytest.raises(ValueError, match="is an export of the .* weights; weights="):
        q2l.load(path, weights="raw" if exported.info.weights == "ema" else "ema")


def test_images_in_memory_lists_globs_and_tensors(model, photos):
    files = sorted(photos.glob("COCO_*.jpg"))[:2]
    expected = model.predict(files)
    assert [p.path for p in expected] == [str(f) for f in files]
    image = Image.open(files[0])
    mixed = model.predict([image, files[1], photos / "missing.jpg"], batch_size=2)
    assert mixed[0].path is None and mixed[0].labels == expected[0].labels
    assert mixed[1].path == str(files[1]) and "missing.jpg" in mixed[2].error
    for got, want in ((mixed[0], expected[0]), (mixed[1], expected[1])):
        assert max(abs(got.scores[k] - want.scores[k]) for k in want.scores) <= 1e-6
    assert [p.path for p in model.predict(f"{photos}/**/*.jpg")][-1].endswith(
        "nested/" + (sorted((photos / "nested").glob("*.jpg"))[0].name)
    )
    batch = torch.stack([model.preprocess(Image.open(f)) for f in files])  # (2, 3, 32, 32)
    from_tensor = model.predict(batch, batch_size=1)
    assert [p.path for p in from_tensor] == [None, None]
    assert from_tensor[1].scores == pytest.approx(expected[1].scores, abs=1e-6)
    assert model.predict(batch[0])[0].labels == expected[0].labels  # one image (3, S, S)
    assert torch.allclose(
        model.scores(batch),
        torch.tensor([list(expected[0].scores.values()), list(expected[1].scores.values())]),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match=r"preprocessed \(B, 3, 32, 32\).*\(2, 3, 16, 16\)"):
        model.predict(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="the list is empty"):
        model.predict([])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        model.predict(photos / "nowhere")


def test_calibrated_thresholds_beside_the_checkpoint_are_used_unless_told_otherwise(
    tiny_checkpoint, photos, tmp_path
):
    checkpoint = tmp_path / "best.pt"
    os.link(tiny_checkpoint, checkpoint)
    plain = q2l.load(checkpoint, device="cpu")
    names = plain.class_names
    chosen = [0.3 + 0.05 * k for k in range(len(names))]
    write_thresholds(
        thresholds_path(checkpoint),
        {"rule_name": "f1", "split": {"dataset": "digits"}, "classes": names, "thresholds": chosen},
    )
    calibrated = q2l.load(checkpoint, device="cpu")
    assert list(calibrated.thresholds.values()) == chosen
    assert "best.thresholds.json" in calibrated.thresholds_note
    for prediction in _readable(calibrated.predict(photos)):
        assert prediction.labels == [
            name for name, t in zip(names, chosen, strict=True) if prediction.scores[name] >= t
        ]
    run = q2l.load(checkpoint, device="cpu", thresholds="run")
    assert set(run.thresholds.values()) == {0.5}
    record = read_thresholds(thresholds_path(checkpoint))
    assert q2l.load(tiny_checkpoint, thresholds=record["path"]).thresholds == calibrated.thresholds


def test_device_precision_and_bad_files(model, tiny_checkpoint, photos, tmp_path):
    bf16 = q2l.load(tiny_checkpoint, device="cpu", precision="bf16")
    assert bf16.description == "PyTorch on cpu, bf16"
    want, got = _readable(model.predict(photos))[0], _readable(bf16.predict(photos))[0]
    assert max(abs(got.scores[k] - want.scores[k]) for k in want.scores) < 0.05
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        q2l.load(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="junk.pt"):
        q2l.load(junk)
    with pytest.raises(ValueError, match="precision must be"):
        q2l.load(tiny_checkpoint, precision="fp8")


def _documented_example() -> list[str]:
    """The ```python blocks of docs/inference.md's "Python API" section, in order."""
    text = (REPO_ROOT / "docs" / "inference.md").read_text()
    section = text.split("## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_documented_example_runs_as_printed(
    tiny_checkpoint, exports, digits_root, tmp_path, monkeypatch, capsys
):
    # The folder a user runs it from after `make train` and q2l-export: a run under outputs/
    # (the ONNX export beside its checkpoint) and the demo's val images under data/.
    checkpoints = tmp_path / "outputs" / "2026-01-01" / "10-00-00" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.link(tiny_checkpoint, checkpoints / "best.pt")
    os.link(exports["onnx"][0], checkpoints / "best.onnx")
    (tmp_path / "data" / "digits").mkdir(parents=True)
    (tmp_path / "data" / "digits" / "val2014").symlink_to(digits_root / "val2014")
    monkeypatch.chdir(tmp_path)
    blocks = _documented_example()
    assert len(blocks) == 2 and "q2l.load(checkpoint)" in blocks[0]
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/inference.md", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("Classifier(10 classes, 32 px")
    assert printed[1] == "['zero', 'one', 'two'] 32 0.5"
    assert len(printed) == 2 + 3 + 1 and printed[2].startswith("data/digits/val2014/COCO_val2014_")
    assert printed[-1].endswith("torch.Size([2, 10])")
    assert len(namespace["predictions"]) == 32
