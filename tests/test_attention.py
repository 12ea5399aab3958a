"""Attention maps: the explicit weights are the ones SDPA applied, the hook leaves the forward
pass unchanged, and q2l-attention writes image-sized overlays for the top-k labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from q2l.data.dataset import BadImageError, load_rgb
from q2l.data.transforms import build_eval_transform
from q2l.inference.attention import write_attention_maps
from q2l.inference.model_info import ModelInfo
from q2l.models import Query2Label, TimmBackbone
from q2l.models.attention_maps import CrossAttentionMaps, attention_weights
from q2l.training.checkpoint import load_checkpoint, model_from_checkpoint
from q2l.utils.drawing import MIN_BAR_HEIGHT, colorize, heatmap_overlay

from .helpers.images import write_huge_png


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    backbone = TimmBackbone("resnet18", pretrained=False)
    return Query2Label(backbone, num_classes=5, hidden_dim=32, ffn_dim=64).eval()


def test_the_hook_changes_nothing_and_records_per_label_maps(model):
    images = torch.randn(2, 3, 64, 96)  # a 2 x 3 feature grid
    with torch.no_grad():
        plain = model(images)
        with CrossAttentionMaps(model) as capture:
            hooked = model(images)
        after = model(images)
    assert torch.equal(plain, hooked) and torch.equal(plain, after)
    assert capture.maps.shape == (2, 5, 2, 3) and capture.per_head.shape == (2, 4, 5, 2, 3)
    assert torch.allclose(capture.maps.sum(dim=(-2, -1)), torch.ones(2, 5))
    assert not model.transformer.decoder_layers[-1].cross_attn._forward_hooks  # removed


def test_explicit_weights_reproduce_the_sdpa_output(model):
    attention = model.transformer.decoder_layers[-1].cross_attn
    query, key, value = torch.randn(1, 5, 32), torch.randn(3, 6, 32), torch.randn(3, 6, 32)
    with torch.no_grad():
        weights = attention_weights(attention, query, key)  # (3, 4, 5, 6)
        heads = attention.v_proj(value).unflatten(-1, (4, -1)).transpose(1, 2)  # (3, 4, 6, 8)
        mixed = (weights @ heads).transpose(1, 2).flatten(2)  # (3, 5, 32)
        assert torch.allclose(attention.out_proj(mixed), attention(query, key, value), atol=1e-5)


def test_the_command_writes_image_sized_overlays_for_the_top_labels(
    compose_config, tiny_checkpoint, digits_root, tmp_path
):
    source = sorted((digits_root / "val2014").glob("*.jpg"))[0]
    image = tmp_path / "photo.png"
    Image.open(source).convert("RGB").resize((48, 40)).save(image)  # not the model's square size
    cfg = compose_config(
        "attention", [f"ckpt={tiny_checkpoint}", f"image={image}", f"output={tmp_path / 'maps'}"]
    )
    written = write_attention_maps(cfg)
    assert len(written) == 3 and [p.name[:3] for p in written] == ["01-", "02-", "03-"]
    checkpoint = load_checkpoint(tiny_checkpoint)
    model, weights = model_from_checkpoint(checkpoint, "auto")  # as the command's default
    info = ModelInfo.from_checkpoint(checkpoint, weights)
    pixels = build_eval_transform(info.image_size, info.mean, info.std)(load_rgb(image))[None]
    with CrossAttentionMaps(model) as capture, torch.no_grad():
        scores = model(pixels).sigmoid()[0]
    for path, label in zip(written, scores.topk(3).indices.tolist(), strict=True):
        assert info.class_names[label] in path.name
        with Image.open(path) as figure:
            # The overlay at the image's own size in the top-left corner, a colour bar of the
            # map's attention weights on its right, the label and score below.
            overlay = heatmap_overlay(Image.open(image), capture.maps[0, label].numpy(), 0.5)
            assert figure.crop((0, 0, 48, 40)).tobytes() == overlay.tobytes()
            assert figure.width > 48 + 40 and figure.height >= MIN_BAR_HEIGHT + 14
            bar = np.asarray(figure.crop((48, 0, figure.width, 20))).astype(int)
            assert (np.abs(bar - colorize(np.array(1.0))).max(axis=-1) <= 12).any()
    with Image.open(tmp_path / "maps" / "grid.png") as grid:
        assert grid.width > 4 * 320 and grid.height > 240 + 17  # input and 3 figures in a row
    with pytest.raises(FileExistsError, match="maps exists"):
        write_attention_maps(cfg)  # never into a folder that holds files
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"nope")
    bad = compose_config(
        "attention", [f"ckpt={tiny_checkpoint}", f"image={broken}", f"output={tmp_path / 'new'}"]
    )
    with pytest.raises(Exception, match="broken.jpg"):
        write_attention_maps(bad)
    assert not (tmp_path / "new").exists()


def test_an_image_over_max_image_pixels_is_refused_unread(compose_config, tmp_path):
    huge = write_huge_png(tmp_path / "huge.png", 12000, 12000)
    output = tmp_path / "maps"
    overrides = ["ckpt=/not/read/first.pt", f"image={huge}", f"output={output}"]
    with pytest.raises(
        BadImageError, match=r"12000 x 12000 .* more than max_image_pixels=89478485"
    ):
        write_attention_maps(compose_config("attention", overrides))
    with pytest.raises(BadImageError, match=r"more than max_image_pixels=1000"):
        write_attention_maps(compose_config("attention", [*overrides, "max_image_pixels=1000"]))
    assert not output.exists()
