"""Query2Label: shapes for CNN and token backbones, resolution independence, weights loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from q2l.models import Query2Label, TimmBackbone
from q2l.models.position_encoding import SinePositionEncoding
from q2l.models.query2label import GroupWiseLinear
from q2l.training.build import build_model
from q2l.utils.errors import InputError

SMALL_HEAD = {"hidden_dim": 32, "ffn_dim": 64, "num_heads": 4}


@pytest.mark.parametrize(
    ("name", "size", "grid"),
    [
        ("resnet18", 64, (2, 2)),
        ("vit_small_patch16_224", 64, (4, 4)),  # (B, N, C) tokens with a class token
        ("swin_tiny_patch4_window7_224", 224, (7, 7)),  # channels-last (B, H, W, C)
    ],
)
def test_backbone_gives_feature_maps(name, size, grid):
    backbone = TimmBackbone(name, pretrained=False, image_size=size)
    features = backbone(torch.randn(2, 3, size, size))
    assert features.shape == (2, backbone.num_channels, *grid)


@pytest.mark.parametrize(("name", "size"), [("resnet18", 64), ("vit_small_patch16_224", 64)])
def test_query2label_logits_shape(name, size):
    model = Query2Label(
        TimmBackbone(name, pretrained=False, image_size=size), num_classes=7, **SMALL_HEAD
    )
    assert model(torch.randn(3, 3, size, size)).shape == (3, 7)


def test_evaluates_at_another_resolution():
    model = Query2Label(
        TimmBackbone("resnet18", pretrained=False), num_classes=5, **SMALL_HEAD
    ).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
        assert model(torch.randn(1, 3, 160, 96)).shape == (1, 5)


def test_paper_defaults_and_removable_self_attention():
    backbone = TimmBackbone("resnet18", pretrained=False)
    model = Query2Label(backbone, num_classes=4)
    transformer = model.transformer
    assert len(transformer.encoder_layers) == 1 and len(transformer.decoder_layers) == 2
    assert model.label_embed.weight.shape == (4, 2048)
    assert transformer.decoder_layers[0].ffn[0].out_features == 8192
    assert all(layer.self_attn is None for layer in transformer.decoder_layers)
    with_self = Query2Label(
        TimmBackbone("resnet18", pretrained=False),
        num_classes=4,
        hidden_dim=32,
        ffn_dim=32,
        decoder_self_attention=True,
    )
    assert all(layer.self_attn is not None for layer in with_self.transformer.decoder_layers)


def test_pre_norm_head_starts_with_an_identity_encoder_and_no_output_norm():
    model = Query2Label(TimmBackbone("resnet18", pretrained=False), 3, **SMALL_HEAD).eval()
    transformer = model.transformer
    assert isinstance(transformer.decoder_norm, torch.nn.Identity)
    assert not any("decoder_norm" in name for name, _ in model.named_parameters())
    tokens, pos = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    with torch.no_grad():  # zero-initialised residual branches: the encoder is a no-op at step 0
        assert torch.equal(transformer.encoder_layers[0](tokens, pos), tokens)
    post = Query2Label(TimmBackbone("resnet18", pretrained=False), 3, **SMALL_HEAD, norm="post")
    assert isinstance(post.transformer.decoder_norm, torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="norm='postnorm'"):
        Query2Label(TimmBackbone("resnet18", pretrained=False), 3, **SMALL_HEAD, norm="postnorm")


def test_post_norm_starts_from_the_official_initialisation():
    """norm="post" draws every tensor from the distribution the official transformer (DETR's,
    on nn.MultiheadAttention) starts from; the reference is built here from torch's own modules
    initialised the way the official `_reset_parameters` does."""
    from scipy.stats import ks_2samp

    from q2l.models.transformer import Transformer

    dim, ffn = 256, 512
    torch.manual_seed(0)
    transformer = Transformer(
        dim, 4, 1, 2, ffn, dropout=0.1, decoder_self_attention="first", norm="post"
    )
    transformer.train(False)
    reference = torch.nn.MultiheadAttention(dim, 4)
    linear1, linear2 = torch.nn.Linear(dim, ffn), torch.nn.Linear(ffn, dim)
    for matrix in (reference.in_proj_weight, reference.out_proj.weight, linear1.weight):
        torch.nn.init.xavier_uniform_(matrix)  # what the official code does to every matrix
    torch.nn.init.xavier_uniform_(linear2.weight)
    official_qkv = reference.in_proj_weight.detach().chunk(3)
    attentions = [transformer.encoder_layers[0].self_attn]
    attentions += [layer.cross_attn for layer in transformer.decoder_layers]
    attentions.append(transformer.decoder_layers[0].self_attn)
    for attention in attentions:
        for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
            projection = getattr(attention, name)
            assert not projection.bias.any()
            same = ks_2samp(projection.weight.detach().flatten(), official_qkv[index].flatten())
            assert same.pvalue > 1e-3, (name, same)
        assert not attention.out_proj.bias.any()
        out = ks_2samp(
            attention.out_proj.weight.detach().flatten(),
            reference.out_proj.weight.detach().flatten(),
        )
        assert out.pvalue > 1e-3
    for layer in [*transformer.encoder_layers, *transformer.decoder_layers]:
        for mine, theirs in ((layer.ffn[0], linear1), (layer.ffn[3], linear2)):
            assert (
                ks_2samp(mine.weight.detach().flatten(), theirs.weight.detach().flatten()).pvalue
                > 1e-3
            )
            assert ks_2samp(mine.bias.detach(), theirs.bias.detach()).pvalue > 1e-3  # nn.Linear's
    # Three (D, D) Xavier draws would be wider: the packed bound is sqrt(6 / 4D), not sqrt(6 / 2D).
    q_proj = transformer.decoder_layers[0].cross_attn.q_proj.weight
    assert float(q_proj.abs().max()) <= (6 / (4 * dim)) ** 0.5


def test_configs_from_before_the_norm_option_build_the_official_layout():
    config = {
        "backbone": {"name": "resnet18", "pretrained": False},
        "model": {"_target_": "q2l.models.query2label.Query2Label", **SMALL_HEAD},
        "dataset": {"image_size": 64},
    }
    model = build_model(config, num_classes=3)
    assert isinstance(model.transformer.decoder_norm, torch.nn.LayerNorm)
    config["model"]["norm"] = "pre"
    assert isinstance(build_model(config, 3).transformer.decoder_norm, torch.nn.Identity)


def test_no_encoder_layers_is_allowed():
    model = Query2Label(
        TimmBackbone("resnet18", pretrained=False),
        num_classes=3,
        **SMALL_HEAD,
        num_encoder_layers=0,
    )
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_groupwise_linear_is_one_classifier_per_label():
    head = GroupWiseLinear(num_classes=3, hidden_dim=5)
    features = torch.randn(2, 3, 5)
    expected = torch.stack(
        [features[:, k] @ head.weight[k] + head.bias[k] for k in range(3)], dim=1
    )
    torch.testing.assert_close(head(features), expected)


def test_position_encoding_follows_feature_size():
    encoding = SinePositionEncoding(8)
    small = encoding(torch.zeros(1, 16, 3, 4))
    large = encoding(torch.zeros(1, 16, 6, 5))
    assert small.shape == (1, 16, 3, 4) and large.shape == (1, 16, 6, 5)
    assert not torch.allclose(small[..., 0, 0], small[..., 2, 3])


def test_input_proj_false_needs_matching_width():
    with pytest.raises(ValueError, match="input_proj=false"):
        Query2Label(
            TimmBackbone("resnet18", pretrained=False),
            num_classes=2,
            hidden_dim=32,
            input_proj=False,
        )


def test_unknown_backbone_and_head_are_rejected():
    with pytest.raises(ValueError, match="not a timm model"):
        TimmBackbone("resnet9000", pretrained=False)
    # A checkpoint's config is file input: only allowlisted targets are rebuilt from it.
    for evil in (
        {"model": {"_target_": "os.system"}},
        {"backbone": {"_target_": "os.system", "name": "x"}},
    ):
        config = {
            "backbone": {"name": "resnet18", "pretrained": False},
            "model": dict(SMALL_HEAD, _target_="q2l.models.query2label.Query2Label"),
            "dataset": {"image_size": 32},
            **evil,
        }
        with pytest.raises(ValueError, match="'os.system', which q2l does not rebuild from a file"):
            build_model(config, num_classes=2, trusted=False)


def test_pretrained_without_weights_says_how_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # empty offline caches
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="backbone.weights"):
        TimmBackbone("resnet18", pretrained=True)
    with pytest.raises(FileNotFoundError, match="no such file"):
        TimmBackbone("resnet18", pretrained=True, weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_loads_local_file(tmp_path, suffix):
    source = TimmBackbone("resnet18", pretrained=False)
    state = {k: v.clone() for k, v in source.body.state_dict().items()}
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    loaded = TimmBackbone("resnet18", pretrained=True, weights=str(path))
    for key, value in loaded.body.state_dict().items():
        torch.testing.assert_close(value, state[key])


def test_weights_for_another_model_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(TimmBackbone("resnet50", pretrained=False).body.state_dict(), path)
    with pytest.raises(InputError, match="do not fit resnet18"):
        TimmBackbone("resnet18", pretrained=True, weights=str(path))


def test_pretrained_uses_timms_offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("q2l.models.backbone.cached_weights", lambda name: tmp_path / "cached.pth")
    state = {
        k: v.clone()
        for k, v in TimmBackbone("resnet18", pretrained=False).body.state_dict().items()
    }
    torch.save(state, tmp_path / "cached.pth")
    loaded = TimmBackbone("resnet18", pretrained=True)
    torch.testing.assert_close(loaded.body.state_dict()["conv1.weight"], state["conv1.weight"])
