"""Official Query2Label checkpoints (SlongLiu/query2labels) as q2l Query2Label state dicts.

The official model (`Qeruy2Label`: a backbone `Joiner`, DETR's transformer, `query_embed`, `fc`)
saves, under "state_dict" (DDP's `module.` prefix or not):

    backbone.0.body.<CNN keys>          torchvision ResNet or inplace-ABN TResNet, no pooling
    backbone.1.pe                       fixed sine positions (1, D, H, W) for one input size
    input_proj.{weight,bias}            only with --keep_input_proj
    transformer.encoder.layers.N.self_attn.{in_proj_weight,in_proj_bias,out_proj.*}
    transformer.encoder.layers.N.{linear1,linear2,norm1,norm2}.*
    transformer.decoder.layers.N.self_attn.*, norm1.*      only in layers that keep it
    transformer.decoder.layers.N.multihead_attn.*, {linear1,linear2,norm2,norm3}.*
    transformer.decoder.norm.*
    query_embed.weight (K, D)   fc.W (1, K, D)   fc.b (1, K)

q2l's Query2Label with norm="post" computes the same forward (post-norm layers, positions added
to the encoder's queries and keys and to the decoder's memory keys, decoder queries starting at
zero with the label embedding as their position, a final decoder norm), so only names and packing
change: each nn.MultiheadAttention's packed q/k/v projection is split into q_proj/k_proj/v_proj,
`linear1`/`linear2` become `ffn.0`/`ffn.3`, and the backbone goes through timm's own conversion of
that architecture's original weights (q2l.models.backbone.convert_state_dict).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from q2l.models.backbone import convert_state_dict
from q2l.models.official_config import CVT_UNSUPPORTED
from q2l.models.position_encoding import SinePositionEncoding
from q2l.models.transformer import SELF_ATTENTION_CHOICES, decoder_self_attention_layers
from q2l.models.weights import unwrap_state_dict
from q2l.utils.errors import InputError

# (official pattern, q2l replacement), tried in order; the first match renames a key.
_RENAMES: list[tuple[str, str]] = [
    (r"^transformer\.encoder\.layers\.(\d+)\.linear1\.", r"transformer.encoder_layers.\1.ffn.0."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear2\.", r"transformer.encoder_layers.\1.ffn.3."),
    (r"^transformer\.encoder\.layers\.(\d+)\.", r"transformer.encoder_layers.\1."),
    (r"^transformer\.decoder\.layers\.(\d+)\.linear1\.", r"transformer.decoder_layers.\1.ffn.0."),
    (r"^transformer\.decoder\.layers\.(\d+)\.linear2\.", r"transformer.decoder_layers.\1.ffn.3."),
    (
        r"^transformer\.decoder\.layers\.(\d+)\.multihead_attn\.",
        r"transformer.decoder_layers.\1.cross_attn.",
    ),
    (r"^transformer\.decoder\.layers\.(\d+)\.", r"transformer.decoder_layers.\1."),
    (r"^transformer\.decoder\.norm\.", "transformer.decoder_norm."),
    (r"^query_embed\.weight$", "label_embed.weight"),
    (r"^input_proj\.", "input_proj."),
]
_BACKBONE_PREFIXES = ("backbone.0.body.", "backbone.0.")
_POSITION_KEY = "backbone.1.pe"


def official_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The model weights of a loaded official checkpoint: its "state_dict" (or "model") entry,
    or the dict itself, with DDP's `module.` prefixes removed."""
    state = unwrap_state_dict(checkpoint, ("state_dict", "model"))
    if state is None or "query_embed.weight" not in state:
        raise InputError(
            "not an official Query2Label checkpoint: no query_embed.weight in its state dict"
        )
    return state


# Where each backbone family's weights sit in an official state dict; the first match names it.
_FAMILY_PREFIXES: list[tuple[str, str]] = [
    ("backbone.0.body.body.", "tresnet"),  # TResNet under the IntermediateLayerGetter
    ("backbone.0.body.layer1.", "resnet"),
    ("backbone.0.layers.0.blocks.", "swin"),
    ("backbone.0.stage0.", "cvt"),
]
# Families whose timm model names start with the family's name (resnet101, tresnet_l, swin_...).
_TIMM_FAMILIES = ("resnet", "tresnet", "swin")


def official_backbone_family(state: dict[str, torch.Tensor]) -> str:
    """The backbone family of official weights, from where its keys sit: "resnet", "tresnet",
    "swin", "cvt", or "unknown"."""
    return next(
        (family for prefix, family in _FAMILY_PREFIXES if any(k.startswith(prefix) for k in state)),
        "unknown",
    )


def check_backbone_family(state: dict[str, torch.Tensor], timm_name: str) -> None:
    """Raise ValueError, saying what to pass, when official weights hold another kind of backbone
    than timm model `timm_name`, or one q2l cannot build (CvT)."""
    family = official_backbone_family(state)
    if family == "cvt":
        raise ValueError(f"this official checkpoint holds a CvT backbone. {CVT_UNSUPPORTED}")
    if family not in _TIMM_FAMILIES:
        return  # an unknown layout: the strict load names whatever does not fit
    architecture = timm_name.split(".")[0]
    # resnetv2 is another architecture (and tresnet does not start with "resnet").
    if not architecture.startswith(family) or architecture.startswith("resnetv2"):
        examples = {
            "resnet": "experiment=coco_r101_448 (or backbone=resnet101_tv)",
            "tresnet": "experiment=coco_tresnetl_448 or coco_tresnetl22k_448",
            "swin": "experiment=coco_swinl_384 (or backbone=swin_large_384_22k)",
        }
        raise ValueError(
            f"this official checkpoint holds a {family} backbone, but the composed config builds "
            f"{timm_name}: pass the matching backbone, e.g. {examples[family]}"
        )


def official_head_options(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The Query2Label options the official weights fix: num_classes, hidden_dim, ffn_dim,
    encoder and decoder layers, input_proj, decoder_self_attention, and the official post-norm
    layout. (num_heads and dropout are not in the weights: they come from the config.)"""
    num_classes, hidden_dim = state["query_embed.weight"].shape
    encoder = _layer_indices(state, "transformer.encoder.layers.")
    decoder = _layer_indices(state, "transformer.decoder.layers.")
    kept = [
        f"transformer.decoder.layers.{index}.self_attn.in_proj_weight" in state
        for index in range(len(decoder))
    ]
    choice = next(
        (
            name
            for name in SELF_ATTENTION_CHOICES
            if decoder_self_attention_layers(name, len(kept)) == kept
        ),
        None,
    )
    if choice is None:
        raise InputError(f"decoder layers with self-attention {kept}: no official flags give that")
    return {
        "num_classes": int(num_classes),
        "hidden_dim": int(hidden_dim),
        "ffn_dim": int(state["transformer.decoder.layers.0.linear1.weight"].shape[0]),
        "num_encoder_layers": len(encoder),
        "num_decoder_layers": len(decoder),
        "input_proj": "input_proj.weight" in state,
        "decoder_self_attention": choice,
        "norm": "post",
    }


def convert_official_state_dict(
    state: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """A state dict for q2l `model` (a Query2Label on a TimmBackbone) from official weights.

    Raises ValueError naming the keys it cannot place, and when the official position buffer is
    not the encoding q2l computes for that feature-map size.
    """
    converted: dict[str, torch.Tensor] = {}
    backbone_state: dict[str, torch.Tensor] = {}
    unplaced = []
    for key, value in state.items():
        prefix = next((p for p in _BACKBONE_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            backbone_state[key.removeprefix(prefix)] = value
        elif key == _POSITION_KEY:
            _check_positions(value)
        elif key.endswith(("in_proj_weight", "in_proj_bias")):
            converted.update(_split_in_projection(key, value))
        elif key == "fc.W":
            converted["classifier.weight"] = value[0]  # (1, K, D) -> (K, D)
        elif key == "fc.b":
            converted["classifier.bias"] = value[0]  # (1, K) -> (K,)
        else:
            renamed = _rename(key)
            if renamed is None:
                unplaced.append(key)
            else:
                converted[renamed] = value
    if unplaced:
        raise InputError(f"official checkpoint keys q2l cannot place: {unplaced[:8]}")
    backbone = model.backbone
    body_state = convert_state_dict(backbone_state, backbone.body, backbone.name)
    converted.update({f"backbone.body.{key}": value for key, value in body_state.items()})
    # BatchNorm step counters: absent from frozen and inplace-ABN norms, unused in evaluation.
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in converted:
            converted[key] = torch.zeros_like(value)
    return converted


def _layer_indices(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    return sorted({int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)})


def _rename(key: str) -> str | None:
    for pattern, replacement in _RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _split_in_projection(key: str, packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """nn.MultiheadAttention's packed (3D, D) / (3D,) input projection as q/k/v_proj entries."""
    owner, kind = key.rsplit(".", 1)
    leaf = "weight" if kind == "in_proj_weight" else "bias"
    base = _rename(f"{owner}.") or ""
    query, key_part, value = packed.chunk(3, dim=0)
    return {
        f"{base}q_proj.{leaf}": query,
        f"{base}k_proj.{leaf}": key_part,
        f"{base}v_proj.{leaf}": value,
    }


def _check_positions(buffer: torch.Tensor) -> None:
    """The official fixed position buffer must be what q2l computes for that map size."""
    expected = SinePositionEncoding(buffer.shape[1] // 2)(torch.zeros(1, *buffer.shape[1:]))
    difference = float((buffer[:1].float() - expected).abs().max())
    if difference > 1e-4:
        raise InputError(
            f"the official position buffer differs from q2l's sine encoding by {difference:.2g}; "
            "this checkpoint's positions are not the official code's normalised sine ones"
        )
