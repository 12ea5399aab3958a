"""Heads: every head on CNN and token backbones, ML-Decoder against its reference formulas,
declared no-weight-decay parameters, decoder self-attention choices, head registration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from q2l.config import CONFIG_DIR
from q2l.models import HEAD_CLASSES, HEADS, GlobalPoolLinear, MLDecoder, Query2Label, TimmBackbone
from q2l.models.ml_decoder import GroupFullyConnected
from q2l.optim import build_adam, build_adamw
from q2l.training.build import build_model

SMALL = {
    Query2Label: {"hidden_dim": 32, "ffn_dim": 64, "num_heads": 4},
    MLDecoder: {"hidden_dim": 32, "ffn_dim": 64, "num_heads": 4, "num_groups": 3},
    GlobalPoolLinear: {},
}


@pytest.mark.parametrize("head", [GlobalPoolLinear, MLDecoder, Query2Label])
@pytest.mark.parametrize(("name", "size"), [("resnet18", 64), ("vit_small_patch16_224", 32)])
def test_every_head_on_cnn_and_token_backbones(head, name, size):
    model = head(TimmBackbone(name, pretrained=False, image_size=size), 7, **SMALL[head])
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7)
    logits.sum().backward()  # every trainable parameter gets a gradient
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_group_fully_connected_is_one_linear_map_per_group():
    head = GroupFullyConnected(num_groups=3, hidden_dim=5, num_classes=7)  # 3 labels per group
    features = torch.randn(2, 3, 5)
    per_group = [features[:, g] @ head.weight[g] for g in range(3)]  # (B, 3) each
    expected = torch.cat(per_group, dim=1)[:, :7] + head.bias
    torch.testing.assert_close(head(features), expected)


def _reference_ml_decoder(model: MLDecoder, images: torch.Tensor) -> torch.Tensor:
    """ML-Decoder's forward from the paper's formulas, with nn.MultiheadAttention (packed q/k/v):
    ReLU(linear(tokens)) is the memory; queries q: norm1(2q) (the reference's stand-in for
    self-attention), cross-attention, norm2, FFN, norm3; group FC; sliced to K; plus bias."""
    layer = model.decoder_layer
    attention = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        attention.in_proj_weight.copy_(
            torch.cat(
                [
                    p.weight
                    for p in (
                        layer.cross_attn.q_proj,
                        layer.cross_attn.k_proj,
                        layer.cross_attn.v_proj,
                    )
                ]
            )
        )
        attention.in_proj_bias.copy_(
            torch.cat(
                [
                    p.bias
                    for p in (
                        layer.cross_attn.q_proj,
                        layer.cross_attn.k_proj,
                        layer.cross_attn.v_proj,
                    )
                ]
            )
        )
        attention.out_proj.load_state_dict(layer.cross_attn.out_proj.state_dict())
    tokens = model.backbone(images).flatten(2).transpose(1, 2)
    memory = F.relu(tokens @ model.input_proj.weight.T + model.input_proj.bias)
    queries = model.query_embed.weight.expand(len(images), -1, -1)
    queries = layer.norm1(queries + queries)
    queries = layer.norm2(queries + attention(queries, memory, memory, need_weights=False)[0])
    hidden = F.relu(queries @ layer.ffn[0].weight.T + layer.ffn[0].bias)
    queries = layer.norm3(queries + hidden @ layer.ffn[3].weight.T + layer.ffn[3].bias)
    groups = torch.stack([queries[:, g] @ model.classifier.weight[g] for g in range(3)], dim=1)
    return groups.flatten(1)[:, :7] + model.classifier.bias


def test_ml_decoder_matches_its_reference_formulas():
    model = MLDecoder(TimmBackbone("resnet18", pretrained=False), 7, **SMALL[MLDecoder]).eval()
    with torch.no_grad():
        model.classifier.bias.normal_()
        images = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(model(images), _reference_ml_decoder(model, images))


def test_ml_decoder_queries_frozen_by_default_and_min_of_groups_and_classes():
    backbone = TimmBackbone("resnet18", pretrained=False)
    model = MLDecoder(backbone, 5)  # paper defaults: K=5 < 100 groups -> one query per label
    assert model.query_embed.weight.shape == (5, 768) and not model.query_embed.weight.requires_grad
    assert model.classifier.weight.shape == (5, 768, 1)
    optimized = {id(p) for group in build_adamw(model).param_groups for p in group["params"]}
    assert id(model.query_embed.weight) not in optimized
    learnable = MLDecoder(backbone, 250, num_groups=100, learnable_queries=True)
    assert learnable.query_embed.weight.requires_grad
    assert learnable.classifier.weight.shape == (100, 768, 3)  # ceil(250 / 100)


def _undecayed(model: nn.Module) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = build_adamw(model).param_groups
    return {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}


def test_models_declare_their_undecayed_parameters():
    q2l = Query2Label(TimmBackbone("resnet18", pretrained=False), 3, **SMALL[Query2Label])
    assert "label_embed.weight" in _undecayed(q2l)
    assert "classifier.weight" not in _undecayed(q2l)  # (K, D): decayed
    learnable = MLDecoder(
        TimmBackbone("resnet18", pretrained=False), 3, learnable_queries=True, **SMALL[MLDecoder]
    )
    assert "query_embed.weight" in _undecayed(learnable)
    # A timm backbone's own declarations count too, under the backbone's prefix.
    vit = GlobalPoolLinear(
        TimmBackbone("vit_small_patch16_224", pretrained=False, image_size=32), 3
    )
    assert {"backbone.body.pos_embed", "backbone.body.cls_token"} <= _undecayed(vit)


def test_adam_adds_l2_decay_to_the_gradients_as_asl_and_ml_decoder_train():
    """optimizer=adam: torch's Adam over ASL's `add_weight_decay` groups (1-D parameters and
    biases undecayed): its step equals plain Adam on grad + wd * weight for decayed weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    optimizer = build_adam(model, lr=0.1, weight_decay=0.5, fused=False)
    assert isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {
        names[id(p)] for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]
    }
    assert decayed == {"0.weight"}
    weight = model[0].weight.detach().clone()
    model(torch.randn(5, 4)).square().sum().backward()
    gradient = model[0].weight.grad.clone() + 0.5 * weight  # coupled L2
    optimizer.step()
    # Adam's first step moves every coordinate by lr * sign(gradient) (up to eps).
    expected = weight - 0.1 * gradient.sign()
    torch.testing.assert_close(model[0].weight.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("choice", "kept"),
    [
        ("none", [False, False, False]),
        ("first", [True, False, False]),
        ("rest", [False, True, True]),
        ("all", [True, True, True]),
        (True, [True, True, True]),  # q2l 0.1 checkpoints stored a bool
        ("false", [False, False, False]),
    ],
)
def test_decoder_self_attention_choices(choice, kept):
    model = Query2Label(
        TimmBackbone("resnet18", pretrained=False),
        3,
        num_decoder_layers=3,
        decoder_self_attention=choice,
        **SMALL[Query2Label],
    )
    assert [layer.self_attn is not None for layer in model.transformer.decoder_layers] == kept
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_bad_decoder_self_attention_is_refused():
    with pytest.raises(ValueError, match="choose one of none, first, rest, all"):
        Query2Label(TimmBackbone("resnet18", pretrained=False), 3, decoder_self_attention="some")


def test_every_head_has_a_schema_a_yaml_and_an_allowlist_entry(compose_config):
    options = {p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml")}
    assert {"q2l", "q2l_small", "baseline", "ml_decoder"} <= options
    for option in sorted(options):
        cfg = compose_config("train", [f"model={option}", "dataset=digits", "backbone=resnet18"])
        config = OmegaConf.to_container(cfg, resolve=True)
        config["backbone"]["pretrained"] = False
        for key in ("hidden_dim", "ffn_dim"):  # small widths: only the wiring is tested here
            if key in config["model"]:
                config["model"][key] = 32
        model = build_model(config, num_classes=3, trusted=False)  # through the allowlist
        assert type(model) in HEAD_CLASSES and HEADS[config["model"]["_target_"]] is type(model)
    cfg = compose_config("train", ["model=ml_decoder", "dataset=digits"])
    assert cfg.model.hidden_dim == 768 and cfg.model.num_groups == 100
    assert cfg.model.learnable_queries is False


def test_attention_maps_are_refused_for_heads_without_label_queries():
    from q2l.models.attention_maps import CrossAttentionMaps

    backbone = TimmBackbone("resnet18", pretrained=False)
    for model in (GlobalPoolLinear(backbone, 3), MLDecoder(backbone, 3, **SMALL[MLDecoder])):
        with pytest.raises(ValueError, match="one query per label"):
            CrossAttentionMaps(model)
