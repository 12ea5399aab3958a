"""The demo's backbone pretraining: loadable weights, built once, never over a user's file."""

from __future__ import annotations

import pytest
import torch

from q2l.demo.owned import FolderNotOursError
from q2l.demo.pretrain import pretrain_digits_backbone
from q2l.models import TimmBackbone

TINY = {"num_images": 64, "epochs": 1, "batch_size": 32}


@pytest.mark.slow
def test_pretraining_writes_weights_the_backbone_loads(tmp_path):
    folder = tmp_path / "resnet10t"
    path = pretrain_digits_backbone(folder, seed=0, **TINY)
    assert path == folder / "weights.safetensors" and path.is_file()
    backbone = TimmBackbone("resnet10t", pretrained=True, weights=str(path))
    fresh = TimmBackbone("resnet10t", pretrained=False)
    weight = "conv1.0.weight"  # the first conv of the tiered stem
    assert not torch.equal(backbone.body.state_dict()[weight], fresh.body.state_dict()[weight])

    modified = path.stat().st_mtime_ns
    pretrain_digits_backbone(folder, seed=0, **TINY)
    assert path.stat().st_mtime_ns == modified  # same arguments: nothing redone
    pretrain_digits_backbone(folder, seed=1, **TINY)
    assert path.stat().st_mtime_ns != modified


def test_a_users_weights_file_is_never_overwritten(tmp_path):
    # The folder holds the user's own weights under the very name the demo would write.
    mine = tmp_path / "weights"
    mine.mkdir()
    (mine / "weights.safetensors").write_bytes(b"my imagenet weights")
    with pytest.raises(FolderNotOursError, match="weights.safetensors"):
        pretrain_digits_backbone(mine, **TINY)
    assert (mine / "weights.safetensors").read_bytes() == b"my imagenet weights"


@pytest.mark.slow
def test_pretraining_leaves_the_callers_random_stream_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pretrain_digits_backbone(tmp_path / "w", num_images=32, epochs=1, batch_size=32)
    assert torch.equal(torch.rand(3), expected)
