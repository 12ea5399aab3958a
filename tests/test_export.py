"""q2l-export: every format is checked against PyTorch, carries its model record, round-trips,
and never replaces a file."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from q2l.inference.export import export
from q2l.inference.model_info import ModelInfo
from q2l.inference.runtime import load_safetensors_export
from q2l.training.checkpoint import load_checkpoint, model_from_checkpoint


def _reference(checkpoint_path, images):
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint_path))
    with torch.no_grad():
        return model(images)


def test_every_format_passes_its_check_and_is_smaller_than_the_checkpoint(exports, tiny_checkpoint):
    for fmt, (path, result) in exports.items():
        assert path.is_file(), fmt
        assert result["max_abs_score_difference"] <= 1e-4, fmt
        # One model's weights in fp32; best.pt holds the raw and the EMA weights (no optimizer).
        assert result["bytes"] < 0.6 * tiny_checkpoint.stat().st_size, fmt
    assert not list(exports["onnx"][0].parent.glob(".*tmp*")), "temporary files left behind"


def test_onnx_has_a_dynamic_batch_axis_and_its_record(exports, tiny_checkpoint):
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(exports["onnx"][0]), providers=["CPUExecutionProvider"]
    )
    info = ModelInfo.from_json(session.get_modelmeta().custom_metadata_map["q2l"], "onnx")
    assert info.class_names == load_checkpoint(tiny_checkpoint)["class_names"]
    assert info.image_size == 32 and len(info.mean) == 3 and info.threshold == 0.5
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32)
        (logits,) = session.run(None, {"images": images.numpy()})
        assert logits.shape == (batch, len(info.class_names))
        assert np.abs(logits - _reference(tiny_checkpoint, images).numpy()).max() < 1e-4


def test_torchscript_and_safetensors_round_trip(exports, tiny_checkpoint):
    images = torch.randn(4, 3, 32, 32)
    expected = _reference(tiny_checkpoint, images)
    extra = {"q2l.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is in maintenance
        traced = torch.jit.load(str(exports["torchscript"][0]), _extra_files=extra)
    assert ModelInfo.from_json(extra["q2l.json"], "ts").image_size == 32
    with torch.no_grad():
        assert torch.allclose(traced(images), expected, atol=1e-5)
    path = exports["safetensors"][0]
    record = json.loads(path.with_suffix(".json").read_text())
    assert (
        record["format"] == "q2l-model-info" and record["model_config"]["model"]["hidden_dim"] == 32
    )
    rebuilt, info = load_safetensors_export(path)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), expected)
    assert info.class_names == record["class_names"]


def test_an_existing_output_is_refused_before_any_work(compose_config, tiny_checkpoint, tmp_path):
    taken = tmp_path / "model.onnx"
    taken.write_text("mine")
    cfg = compose_config("export", [f"ckpt={tiny_checkpoint}", f"output={taken}"])
    with pytest.raises(FileExistsError, match="model.onnx exists"):
        export(cfg)
    assert taken.read_text() == "mine"
    missing = compose_config("export", [f"ckpt={tmp_path / 'nope.pt'}", "format=safetensors"])
    with pytest.raises(Exception, match="nope.pt"):
        export(missing)
    wrong = compose_config(
        "export", [f"ckpt={tiny_checkpoint}", f"output={tmp_path / 'x.onnx'}", "format=safetensors"]
    )
    with pytest.raises(ValueError, match="ends in .safetensors"):
        export(wrong)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
