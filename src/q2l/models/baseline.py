"""The Query2Label paper's baseline: global average pooling of the backbone's features, then one
linear classifier (Liu et al. 2021, arXiv 2107.10834, the "baseline" rows of its tables).

With a token backbone (ViT, Swin) the pooling averages the patch tokens, not a class token.
"""

from __future__ import annotations

import torch
from torch import nn


class GlobalPoolLinear(nn.Module):
    """Global average pooling + linear classifier.

    forward: images (B, 3, H, W) -> logits (B, K). No sigmoid: thresholds live in metrics.

    Args:
        backbone: module mapping images to features (B, C, H', W'), with `num_channels` = C.
        num_classes: K.
        dropout: dropout on the pooled features before the classifier (0 turns it off).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.num_channels, num_classes)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)  # (B, C, H', W')
        pooled = features.mean(dim=(2, 3))  # (B, C)
        return self.classifier(self.dropout(pooled))  # (B, K)

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW leaves undecayed beyond 1-D ones (q2l.optim): none here."""
        return set()
