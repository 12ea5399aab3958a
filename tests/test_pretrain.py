"""The demo's single-digit backbone pretraining: produces loadable weights, idempotently."""

from __future__ import annotations

import torch

from q2l.models import TimmBackbone
from q2l.pretrain import pretrain_digits_backbone


def test_pretraining_writes_weights_the_backbone_loads(tmp_path):
    output = tmp_path / "resnet18.safetensors"
    path = pretrain_digits_backbone(output, num_images=64, epochs=1, batch_size=32, seed=0)
    assert path == output and output.is_file() and output.with_suffix(".json").is_file()
    backbone = TimmBackbone("resnet18", pretrained=True, weights=str(output))
    fresh = TimmBackbone("resnet18")
    weight = "conv1.weight"
    assert not torch.equal(backbone.body.state_dict()[weight], fresh.body.state_dict()[weight])

    modified = output.stat().st_mtime_ns
    pretrain_digits_backbone(output, num_images=64, epochs=1, batch_size=32, seed=0)
    assert output.stat().st_mtime_ns == modified  # same arguments: nothing redone
    pretrain_digits_backbone(output, num_images=64, epochs=1, batch_size=32, seed=1)
    assert output.stat().st_mtime_ns != modified


def test_pretraining_leaves_the_callers_random_stream_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pretrain_digits_backbone(tmp_path / "w.safetensors", num_images=32, epochs=1, batch_size=32)
    assert torch.equal(torch.rand(3), expected)
