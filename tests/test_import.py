"""q2l-import: random models in the official Query2Label key layout give the same logits after
import as a reference forward written here from the official model's formulas; the imported
checkpoint works with eval.py and init_from."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from q2l.cli.import_official import main
from q2l.evaluation.evaluate import evaluate_checkpoint
from q2l.models.official_config import find_official_config, read_official_config
from q2l.training.checkpoint import load_checkpoint, model_from_checkpoint
from q2l.training.importing import import_official
from q2l.training.run import train

from .conftest import tiny_overrides as _tiny_overrides
from .helpers.layouts import miil_tresnet_layout, randomize

NUM_CLASSES = 10  # the digits data set's, so eval.py can run the imported model on it
TINY_TRESNET = {"layers": [1, 1, 1, 1], "width_factor": 0.5}


R18 = ["backbone=resnet18"]  # the official ResNet checkpoints here are ResNet-18s


def tiny_overrides(digits_root: Path, cache_dir: Path) -> list[str]:
    """The tiny run's overrides without its test backbone: an import builds the backbone its
    checkpoint holds."""
    return [o for o in _tiny_overrides(digits_root, cache_dir) if not o.startswith("backbone.name")]


# The official model's forward, from its formulas (DETR post-norm transformer, batch first).


def _attention(weights, prefix, query, key, value, num_heads):
    """nn.MultiheadAttention with a packed (3D, D) input projection: (B, L, D) -> (B, Lq, D)."""
    dim = query.shape[-1]
    w, b = weights[f"{prefix}.in_proj_weight"], weights[f"{prefix}.in_proj_bias"]
    q, k, v = (
        x @ w[i * dim : (i + 1) * dim].T + b[i * dim : (i + 1) * dim]
        for i, x in enumerate((query, key, value))
    )

    def heads(x):
        return x.unflatten(-1, (num_heads, dim // num_heads)).transpose(1, 2)  # (B, h, L, d)

    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(dim // num_heads)
    out = (scores.softmax(-1) @ heads(v)).transpose(1, 2).flatten(2)
    return out @ weights[f"{prefix}.out_proj.weight"].T + weights[f"{prefix}.out_proj.bias"]


def _norm(weights, prefix, x):
    return F.layer_norm(x, x.shape[-1:], weights[f"{prefix}.weight"], weights[f"{prefix}.bias"])


def _ffn(weights, prefix, x):
    hidden = F.relu(x @ weights[f"{prefix}.linear1.weight"].T + weights[f"{prefix}.linear1.bias"])
    return hidden @ weights[f"{prefix}.linear2.weight"].T + weights[f"{prefix}.linear2.bias"]


def _reference_logits(weights, features, num_heads, encoder_layers, decoder_layers):
    """Official Query2Label from the backbone's features (B, C, H, W) to logits (B, K)."""
    if "input_proj.weight" in weights:
        features = F.conv2d(features, weights["input_proj.weight"], weights["input_proj.bias"])
    memory = features.flatten(2).transpose(1, 2)  # (B, N, D)
    pos = weights["backbone.1.pe"].flatten(2).transpose(1, 2)  # (1, N, D)
    for n in range(encoder_layers):
        p = f"transformer.encoder.layers.{n}"
        attended = _attention(
            weights, f"{p}.self_attn", memory + pos, memory + pos, memory, num_heads
        )
        memory = _norm(weights, f"{p}.norm1", memory + attended)
        memory = _norm(weights, f"{p}.norm2", memory + _ffn(weights, p, memory))
    query_pos = weights["query_embed.weight"].expand(len(memory), -1, -1)  # (B, K, D)
    target = torch.zeros_like(query_pos)
    for n in range(decoder_layers):
        p = f"transformer.decoder.layers.{n}"
        if f"{p}.self_attn.in_proj_weight" in weights:
            q = target + query_pos
            target = _norm(
                weights,
                f"{p}.norm1",
                target + _attention(weights, f"{p}.self_attn", q, q, target, num_heads),
            )
        attended = _attention(
            weights, f"{p}.multihead_attn", target + query_pos, memory + pos, memory, num_heads
        )
        target = _norm(weights, f"{p}.norm2", target + attended)
        target = _norm(weights, f"{p}.norm3", target + _ffn(weights, p, target))
    label_features = _norm(weights, "transformer.decoder.norm", target)
    return (weights["fc.W"] * label_features).sum(-1) + weights["fc.b"]


def _sine_positions(dim, height, width):
    """DETR's normalised sine encoding as the official buffer holds it: (1, dim, H, W)."""
    count = dim // 2
    frequencies = 10000 ** (2 * (torch.arange(count) // 2) / count)

    def encode(positions):  # (L,) -> (L, count), sin on even channels, cos on odd ones
        angles = positions[:, None] / frequencies
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    y = encode(torch.arange(1, height + 1) / (height + 1e-6) * 2 * math.pi)
    x = encode(torch.arange(1, width + 1) / (width + 1e-6) * 2 * math.pi)
    grid = torch.cat([y[:, None].expand(-1, width, -1), x[None].expand(height, -1, -1)], dim=-1)
    return grid.permute(2, 0, 1)[None]


def _official_head(
    hidden,
    ffn,
    encoder_layers,
    decoder_layers,
    keep_self_attention,
    input_proj,
    channels,
    grid,
    seed=0,
):
    """Random transformer/query/fc weights in the official key layout."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return (torch.rand(shape, generator=generator) - 0.5) * 2 * scale

    def attention(prefix):
        return {
            f"{prefix}.in_proj_weight": rand(3 * hidden, hidden, scale=hidden**-0.5),
            f"{prefix}.in_proj_bias": rand(3 * hidden),
            f"{prefix}.out_proj.weight": rand(hidden, hidden, scale=hidden**-0.5),
            f"{prefix}.out_proj.bias": rand(hidden),
        }

    def block(prefix, norms):
        out = {
            f"{prefix}.linear1.weight": rand(ffn, hidden, scale=hidden**-0.5),
            f"{prefix}.linear1.bias": rand(ffn),
            f"{prefix}.linear2.weight": rand(hidden, ffn, scale=ffn**-0.5),
            f"{prefix}.linear2.bias": rand(hidden),
        }
        for norm in norms:
            out[f"{prefix}.{norm}.weight"] = 1 + rand(hidden)
            out[f"{prefix}.{norm}.bias"] = rand(hidden)
        return out

    weights = {}
    for n in range(encoder_layers):
        p = f"transformer.encoder.layers.{n}"
        weights |= attention(f"{p}.self_attn") | block(p, ("norm1", "norm2"))
    for n in range(decoder_layers):
        p = f"transformer.decoder.layers.{n}"
        weights |= attention(f"{p}.multihead_attn") | block(p, ("norm2", "norm3"))
        if keep_self_attention[n]:
            weights |= attention(f"{p}.self_attn") | block(p, ("norm1",))
    weights["transformer.decoder.norm.weight"] = 1 + rand(hidden)
    weights["transformer.decoder.norm.bias"] = rand(hidden)
    weights["query_embed.weight"] = rand(NUM_CLASSES, hidden, scale=1.0)
    weights["fc.W"] = rand(1, NUM_CLASSES, hidden, scale=hidden**-0.5)
    weights["fc.b"] = rand(1, NUM_CLASSES)
    if input_proj:
        weights["input_proj.weight"] = rand(hidden, channels, 1, 1, scale=channels**-0.5)
        weights["input_proj.bias"] = rand(hidden)
    weights["backbone.1.pe"] = _sine_positions(hidden, *grid)
    return weights


def _resnet18_official():
    """torchvision ResNet-18 with frozen BatchNorm, as the official backbone builds it:
    (weights under backbone.0.body., the features function)."""
    resnet = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    randomize(resnet, seed=1)
    trunk = nn.Sequential(*list(resnet.children())[:-2]).eval()  # up to layer4
    state = {f"backbone.0.body.{k}": v for k, v in resnet.state_dict().items() if "fc." not in k}
    return state, trunk


def _tresnet_official():
    """A small timm TResNet in Alibaba-MIIL's inplace-ABN layout, under backbone.0.body.body."""
    tresnet = timm.create_model("tresnet_m", num_classes=0, global_pool="", **TINY_TRESNET)
    randomize(tresnet, seed=2)
    tresnet.eval()
    state = {f"backbone.0.body.{k}": v for k, v in miil_tresnet_layout(tresnet).items()}
    return state, tresnet.forward_features


VARIANTS = {
    # name: (backbone, overrides, hidden, ffn, encoder, decoder, kept self-attention, input_proj)
    "r18_proj_module_prefix": ("resnet18", R18, 32, 64, 1, 2, [False, False], True),
    "r18_no_proj_first_self_attention": (
        "resnet18",
        [*R18, "model.hidden_dim=16"],
        512,
        64,
        1,
        2,
        [True, False],
        False,
    ),
    "tresnet_rest_self_attention": (
        "tresnet_m",
        ["backbone=tresnet_m", "++backbone.timm_kwargs={layers:[1,1,1,1],width_factor:0.5}"],
        32,
        48,
        2,
        3,
        [False, True, True],
        True,
    ),
}


@pytest.fixture
def official_checkpoint(tmp_path):
    def make(variant):
        backbone, _, hidden, ffn, encoders, decoders, kept, proj = VARIANTS[variant]
        state, features_of = _resnet18_official() if backbone == "resnet18" else _tresnet_official()
        channels = 512 if backbone == "resnet18" else 1024
        state |= _official_head(hidden, ffn, encoders, decoders, kept, proj, channels, (2, 2))
        if variant.endswith("module_prefix"):
            state = {f"module.{k}": v for k, v in state.items()}
        path = tmp_path / f"{variant}.pkl"
        optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}
        # What main_mlc.py saves; its best mAP is a NumPy scalar.
        torch.save(
            {
                "epoch": 12,
                "arch": "Q2L",
                "state_dict": state,
                "best_mAP": np.float64(84.9),
                "optimizer": optimizer,
            },
            path,
        )
        reference_weights = {k.removeprefix("module."): v for k, v in state.items()}
        return path, reference_weights, features_of

    return make


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_imported_model_gives_the_official_logits(
    variant, official_checkpoint, digits_root, tmp_path
):
    source, weights, features_of = official_checkpoint(variant)
    _, overrides, hidden, _, encoders, decoders, _, _ = VARIANTS[variant]
    base = tiny_overrides(digits_root, tmp_path / "cache") + ["dataset.image_size=64"]
    output = import_official(source, tmp_path / "q2l.pt", base + overrides)
    checkpoint = load_checkpoint(output)
    assert checkpoint["class_names"][:2] == ["zero", "one"]
    assert checkpoint["imported_from"]["best_mAP_voc"] == pytest.approx(84.9)
    assert checkpoint["config"]["model"]["hidden_dim"] == hidden  # read from the weights
    model, _ = model_from_checkpoint(checkpoint)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        imported = model(images)
        expected = _reference_logits(weights, features_of(images), 4, encoders, decoders)
    difference = float((imported - expected).abs().max())
    print(f"{variant}: max |logit difference| = {difference:.2e}")
    assert difference < 1e-4


@pytest.mark.slow
def test_imported_checkpoint_works_with_eval_and_init_from(
    official_checkpoint, digits_root, tmp_path, compose_config, tiny_cfg
):
    source, _, _ = official_checkpoint("r18_proj_module_prefix")
    overrides = [*tiny_overrides(digits_root, tmp_path / "cache"), *R18]
    output = tmp_path / "imported.pt"
    assert main([str(source), str(output), *overrides]) == 0
    assert main([str(source), str(output), *overrides]) == 2  # never replaces a file
    result = evaluate_checkpoint(compose_config("eval", [f"ckpt={output}"]))
    assert result["num_images"] == 32 and math.isfinite(result["metrics"]["mAP"])
    summary = train(
        tiny_cfg("trainer.epochs=1", f"init_from={output}", "backbone.name=resnet18"),
        tmp_path / "tuned",
    )
    assert summary["status"] == "completed"
    with pytest.raises(ValueError, match="init_from="):
        train(tiny_cfg(f"resume={output}"), tmp_path / "resumed")


def test_import_refuses_what_it_cannot_place(official_checkpoint, digits_root, tmp_path):
    source, weights, _ = official_checkpoint("r18_proj_module_prefix")
    weights["transformer.decoder.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": weights}, tmp_path / "odd.pkl")
    overrides = [*tiny_overrides(digits_root, tmp_path / "cache"), *R18]
    with pytest.raises(ValueError, match="cannot place.*decoder.extra"):
        import_official(tmp_path / "odd.pkl", tmp_path / "odd.pt", overrides)
    weights.pop("transformer.decoder.extra.weight")
    weights["backbone.1.pe"] = weights["backbone.1.pe"] + 0.5
    torch.save({"state_dict": weights}, tmp_path / "pos.pkl")
    with pytest.raises(ValueError, match="position buffer"):
        import_official(tmp_path / "pos.pkl", tmp_path / "pos.pt", overrides)


# ---- the run's own config, backbone kinds, Swin -------------------------------------------------


def _swin_official():
    """A small timm Swin in Microsoft's layout (the official code's Swin): patch merging at the end
    of a stage instead of the start of the next, relative position index buffers kept."""
    swin = timm.create_model(
        "swin_large_patch4_window12_384", num_classes=0, global_pool="", **TINY_SWIN
    )
    randomize(swin, seed=3)
    swin.eval()
    state = {}
    for key, value in swin.state_dict().items():
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if match:
            key = f"layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
        state[f"backbone.0.{key}"] = value
    for name, buffer in swin.named_buffers():
        if name.endswith("relative_position_index"):
            state[f"backbone.0.{name}"] = buffer

    def features_of(images):
        return swin.forward_features(images).permute(0, 3, 1, 2)  # (B, C, H, W) as the official

    return state, features_of


TINY_SWIN = {
    "img_size": 64,
    "embed_dim": 16,
    "depths": (1, 1, 1, 1),
    "num_heads": (1, 1, 1, 1),
    "window_size": 2,
}
SWIN_OVERRIDES = [
    "backbone=swin_large_384_22k",
    "++backbone.timm_kwargs={embed_dim:16,depths:[1,1,1,1],num_heads:[1,1,1,1],window_size:2}",
]


def test_official_swin_checkpoints_import_to_the_official_logits(digits_root, tmp_path):
    state, features_of = _swin_official()
    state |= _official_head(128, 64, 1, 2, [False, False], False, 128, (2, 2))
    torch.save({"state_dict": state}, tmp_path / "swin.pkl")
    base = tiny_overrides(digits_root, tmp_path / "cache") + ["dataset.image_size=64"]
    output = import_official(tmp_path / "swin.pkl", tmp_path / "swin.pt", base + SWIN_OVERRIDES)
    model, _ = model_from_checkpoint(load_checkpoint(output))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (model(images) - _reference_logits(state, features_of(images), 4, 1, 2)).abs()
    print(f"swin: max |logit difference| = {float(difference.max()):.2e}")
    assert float(difference.max()) < 1e-4


def _write_config(folder, **fields):
    (folder / "config_new.json").write_text(json.dumps(fields))


def test_the_release_config_beside_the_checkpoint_sets_what_the_weights_do_not(
    official_checkpoint, digits_root, tmp_path, caplog
):
    source, _, _ = official_checkpoint("tresnet_rest_self_attention")
    overrides = [
        o
        for o in tiny_overrides(digits_root, tmp_path / "cache")
        if not o.startswith("dataset.image_size")  # the run's config says
    ] + VARIANTS["tresnet_rest_self_attention"][1]
    # As a release records it: the run's arguments; orid_norm is what TResNet weights want.
    _write_config(source.parent, img_size=64, orid_norm=True, nheads=4, dropout=0.2, hidden_dim=32)
    with caplog.at_level(logging.INFO, logger="q2l.import"):
        output = import_official(source, tmp_path / "a.pt", overrides)
    checkpoint = load_checkpoint(output)
    config = checkpoint["config"]
    assert config["backbone"]["normalization"] == "none"  # mean 0 / std 1
    assert config["model"]["dropout"] == 0.2 and config["model"]["norm"] == "post"
    assert config["dataset"]["image_size"] == 64
    recorded = checkpoint["imported_from"]["official_config"]["recorded"]
    assert recorded["orid_norm"] is True and recorded["img_size"] == 64
    assert "not recorded" not in caplog.text

    # Without orid_norm the official code fed ImageNet statistics.
    _write_config(source.parent, img_size=64)
    output = import_official(source, tmp_path / "b.pt", overrides)
    assert load_checkpoint(output)["config"]["backbone"]["normalization"] == "imagenet"

    # A command-line choice wins, and the disagreement is said.
    _write_config(source.parent, orid_norm=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="q2l.import"):
        output = import_official(
            source, tmp_path / "c.pt", [*overrides, "backbone.normalization=imagenet"]
        )
    assert load_checkpoint(output)["config"]["backbone"]["normalization"] == "imagenet"
    assert "backbone.normalization=imagenet from the command line" in caplog.text


def test_a_tresnet_import_without_a_recorded_normalisation_warns_naming_the_choice(
    official_checkpoint, digits_root, tmp_path, caplog
):
    source, _, _ = official_checkpoint("tresnet_rest_self_attention")
    overrides = (
        tiny_overrides(digits_root, tmp_path / "cache") + VARIANTS["tresnet_rest_self_attention"][1]
    )
    with caplog.at_level(logging.WARNING, logger="q2l.import"):
        output = import_official(source, tmp_path / "q2l.pt", overrides)
    chosen = load_checkpoint(output)["config"]["backbone"]["normalization"]
    warning = caplog.text
    assert "not recorded" in warning and f"backbone.normalization={chosen}" in warning
    assert "config_new.json" in warning and "--official-config" in warning
    # A ResNet has nothing to guess: the official code always gave it ImageNet statistics.
    source, _, _ = official_checkpoint("r18_proj_module_prefix")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="q2l.import"):
        import_official(
            source, tmp_path / "r.pt", [*tiny_overrides(digits_root, tmp_path / "c2"), *R18]
        )
    assert "not recorded" not in caplog.text


def test_the_image_size_is_read_from_the_position_buffer_without_a_config(
    official_checkpoint, digits_root, tmp_path
):
    source, _, _ = official_checkpoint("r18_proj_module_prefix")
    overrides = [
        o
        for o in tiny_overrides(digits_root, tmp_path / "cache")
        if not o.startswith("dataset.image_size")
    ]
    output = import_official(source, tmp_path / "q2l.pt", [*overrides, *R18])
    config = load_checkpoint(output)["config"]
    assert config["dataset"]["image_size"] == 64  # a 2x2 buffer at stride 32
    assert config["model"]["dropout"] == 0.1  # the official default, for fine-tuning


def test_cvt_and_mismatched_backbones_are_refused_with_what_to_do(
    official_checkpoint, digits_root, tmp_path
):
    source, weights, _ = official_checkpoint("r18_proj_module_prefix")
    overrides = tiny_overrides(digits_root, tmp_path / "cache")
    cvt = {k: v for k, v in weights.items() if not k.startswith("backbone.0.")}
    cvt["backbone.0.stage0.patch_embed.proj.weight"] = torch.zeros(64, 3, 7, 7)
    torch.save({"state_dict": cvt}, tmp_path / "cvt.pkl")
    with pytest.raises(ValueError, match="CvT backbones are not supported: q2l builds every"):
        import_official(tmp_path / "cvt.pkl", tmp_path / "cvt.pt", overrides)
    # ResNet weights with a TResNet config: said before anything is built.
    with pytest.raises(ValueError, match="holds a resnet backbone.*experiment=coco_r101_448"):
        import_official(source, tmp_path / "t.pt", [*overrides, "backbone=tresnet_m"])
    # The run's config names its backbone: the composed one must be that model.
    _write_config(source.parent, backbone="resnet101")
    with pytest.raises(ValueError, match=r"backbone\.name=resnet101\.tv_in1k"):
        import_official(source, tmp_path / "n.pt", overrides)
    _write_config(source.parent, backbone="CvT_w24")
    with pytest.raises(ValueError, match="CvT backbones are not supported"):
        import_official(source, tmp_path / "c.pt", overrides)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"orid_norm": 1}', "orid_norm=1 is not a true/false"),
        ('{"img_size": true}', "img_size=True is not a whole number"),
        ('["a"]', "not an object"),
        ("{", "cannot be read as JSON"),
    ],
)
def test_a_bad_release_config_is_refused(tmp_path, content, message):
    path = tmp_path / "config_new.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_official_config(path)
    assert find_official_config(tmp_path / "checkpoint.pkl") == path
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_official_config(tmp_path / "checkpoint.pkl", tmp_path / "missing.json")
