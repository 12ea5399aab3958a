"""Model zoo: timm backbones under Query2Label heads, built from plain config dicts."""

from __future__ import annotations

from typing import Any

from torch import nn

from q2l.models.backbone import TimmBackbone
from q2l.models.query2label import Query2Label

# Heads a config may name. Checkpoints carry their config, and a `_target_` read from a file is
# never imported blindly: eval rebuilds only what is listed here.
HEADS: dict[str, type[nn.Module]] = {
    "q2l.models.Query2Label": Query2Label,
    "q2l.models.query2label.Query2Label": Query2Label,
}


def build_model(
    backbone: dict[str, Any], head: dict[str, Any], num_classes: int, image_size: int | None = None
) -> nn.Module:
    """Build backbone + head from plain dicts (a composed config or a checkpoint's copy of one).

    Args:
        backbone: {name, pretrained, weights, kwargs} for `TimmBackbone`.
        head: head options with `_target_` naming one of `HEADS`.
        num_classes: number of labels K.
        image_size: input size, for backbones that fix it at construction (ViT, Swin).
    Returns:
        a module mapping images (B, 3, H, W) to logits (B, K).
    """
    head = dict(head)
    target = head.pop("_target_", "q2l.models.Query2Label")
    head.pop("_partial_", None)
    if target not in HEADS:
        raise ValueError(f"model._target_={target!r} is not a known head; choose from {sorted(HEADS)}")
    body = TimmBackbone(
        name=backbone["name"],
        pretrained=backbone.get("pretrained", False),
        weights=backbone.get("weights"),
        image_size=image_size,
        **dict(backbone.get("kwargs") or {}),
    )
    return HEADS[target](backbone=body, num_classes=num_classes, **head)


__all__ = ["HEADS", "Query2Label", "TimmBackbone", "build_model"]
