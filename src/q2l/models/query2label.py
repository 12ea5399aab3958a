"""Query2Label (Liu et al. 2021, arXiv 2107.10834): label embeddings query a backbone's features.

backbone -> 1x1 input projection -> + sine positions -> transformer encoder -> decoder whose
queries are one learnable embedding per label -> one linear classifier per label -> logits.

Sizes default to the paper's: 1 encoder / 2 decoder layers, 4 heads, hidden 2048, FFN 8192,
decoder self-attention removed; dropout defaults to 0 (the paper: 0.1, which learned more slowly
here: docs/heads.md). Positions are added to the encoder's queries and
keys and to the decoder's memory keys; decoder queries start at zero with the label embedding as
their position, as in the official code (SlongLiu/query2labels). The layers are pre-norm without
output LayerNorms by default, which learns much faster than the official post-norm layout
(docs/heads.md); norm="post" is the official forward exactly, which the paper presets use and
into which `q2l-import` turns official checkpoints (q2l.models.official).
"""

from __future__ import annotations

import torch
from torch import nn

from q2l.models.position_encoding import SinePositionEncoding
from q2l.models.transformer import Transformer
from q2l.utils.errors import ConfigError


class Query2Label(nn.Module):
    """Query2Label classifier.

    forward: images (B, 3, H, W) -> logits (B, K). No sigmoid: thresholds live in metrics.

    Args:
        backbone: module mapping images to features (B, C, H', W'), with `num_channels` = C.
        num_classes: K, one label query per class.
        hidden_dim: transformer width D.
        num_encoder_layers: transformer encoder layers over the feature map (0: none).
        num_decoder_layers: decoder layers in which the label queries attend to the features.
        num_heads: attention heads (hidden_dim must be divisible by it).
        ffn_dim: width of the feed-forward layers.
        dropout: dropout in the transformer (the paper's 0.1; q2l's default 0, docs/heads.md).
        decoder_self_attention: decoder layers that keep self-attention among label queries:
            "none" (the paper), "first", "rest" or "all" (the official code's
            --keep_first_self_attn_dec / --keep_other_self_attn_dec).
        input_proj: 1x1 conv from C to D; with False, C must equal D (the official code's default).
        norm: "pre" (q2l's layout) or "post" (the official one): q2l.models.transformer.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        hidden_dim: int = 2048,
        num_encoder_layers: int = 1,
        num_decoder_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int = 8192,
        dropout: float = 0.0,
        decoder_self_attention: str = "none",
        input_proj: bool = True,
        norm: str = "pre",
    ) -> None:
        super().__init__()
        channels = backbone.num_channels
        if not input_proj and channels != hidden_dim:
            raise ConfigError(
                f"input_proj=false needs hidden_dim == backbone channels ({channels}), got "
                f"{hidden_dim}"
            )
        self.backbone = backbone
        self.input_proj = (
            nn.Conv2d(channels, hidden_dim, kernel_size=1) if input_proj else nn.Identity()
        )
        self.position_encoding = SinePositionEncoding(hidden_dim // 2)
        self.transformer = Transformer(
            hidden_dim=hidden_dim,
            num_heads=num_heads,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            ffn_dim=ffn_dim,
            dropout=dropout,
            decoder_self_attention=decoder_self_attention,
            norm=norm,
        )
        self.label_embed = nn.Embedding(num_classes, hidden_dim)
        self.classifier = GroupWiseLinear(num_classes, hidden_dim)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.input_proj(self.backbone(images))  # (B, D, H', W')
        pos = self.position_encoding(features)  # (1, D, H', W')
        memory = features.flatten(2).transpose(1, 2)  # (B, N, D)
        pos = pos.flatten(2).transpose(1, 2)  # (1, N, D)
        label_features = self.transformer(memory, pos, self.label_embed.weight)  # (B, K, D)
        return self.classifier(label_features)  # (B, K)

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW leaves undecayed beyond 1-D ones (q2l.optim)."""
        return {"label_embed.weight"}


class GroupWiseLinear(nn.Module):
    """One linear classifier per label: (B, K, D) -> (B, K), logit_k = w_k · x_k + b_k.

    Computed as one elementwise product and sum over D for all K labels at once.
    """

    def __init__(self, num_classes: int, hidden_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, hidden_dim))
        self.bias = nn.Parameter(torch.empty(num_classes))
        bound = hidden_dim**-0.5  # same range as nn.Linear's default init
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, label_features: torch.Tensor) -> torch.Tensor:
        return (label_features * self.weight).sum(-1) + self.bias
