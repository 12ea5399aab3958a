"""ML-Decoder (Ridnik et al., WACV 2023, arXiv 2111.12933): group queries cross-attend to the
image, and a group fully-connected layer expands each query's output into several labels.

backbone -> linear projection to the decoder width + ReLU -> one decoder layer whose G = min(K,
num_groups) queries attend to the image tokens (cross-attention only: no self-attention among
queries, no positional encoding) -> group fully-connected: query g gives the logits of labels
g·F ... g·F + F − 1, F = ceil(K / G).

Defaults are the paper's (and Alibaba-MIIL/ML_Decoder's): width 768, 8 heads, FFN 2048, dropout
0.1, up to 100 groups, frozen random queries. Unlike the reference, whose group FC loops over the
groups in Python, all groups are one einsum.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from q2l.models.transformer import Attention, FeedForward, init_like_multihead_attention
from q2l.utils.errors import ConfigError


class MLDecoder(nn.Module):
    """ML-Decoder classifier.

    forward: images (B, 3, H, W) -> logits (B, K). No sigmoid: thresholds live in metrics.

    Args:
        backbone: module mapping images to features (B, C, H', W'), with `num_channels` = C.
        num_classes: K.
        num_groups: at most this many queries G = min(K, num_groups); each decodes ceil(K / G)
            labels. With K <= num_groups every label has its own query ("full decoding").
        hidden_dim: decoder width D.
        num_heads, ffn_dim, dropout: sizes of the decoder layer.
        learnable_queries: train the query embeddings (the paper keeps them frozen at their random
            initialisation).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_groups: int = 100,
        hidden_dim: int = 768,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        learnable_queries: bool = False,
    ) -> None:
        super().__init__()
        if num_groups < 1:
            raise ConfigError(f"num_groups must be >= 1, got {num_groups}")
        if hidden_dim % num_heads:
            raise ConfigError(f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}")
        groups = min(num_classes, num_groups)
        self.backbone = backbone
        self.input_proj = nn.Linear(backbone.num_channels, hidden_dim)
        self.query_embed = nn.Embedding(groups, hidden_dim)
        self.query_embed.requires_grad_(learnable_queries)
        self.decoder_layer = CrossAttentionDecoderLayer(hidden_dim, num_heads, ffn_dim, dropout)
        self.classifier = GroupFullyConnected(groups, hidden_dim, num_classes)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)  # (B, C, H', W')
        tokens = features.flatten(2).transpose(1, 2)  # (B, N, C)
        memory = F.relu(self.input_proj(tokens))  # (B, N, D)
        queries = self.query_embed.weight.unsqueeze(0)  # (1, G, D)
        group_features = self.decoder_layer(queries, memory)  # (B, G, D)
        return self.classifier(group_features)  # (B, K)

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW leaves undecayed beyond 1-D ones (q2l.optim)."""
        return {"query_embed.weight"}


class CrossAttentionDecoderLayer(nn.Module):
    """Post-norm decoder layer without self-attention: (1|B, G, D), (B, N, D) -> (B, G, D).

    Where self-attention would be, the reference layer adds the queries to a dropout of themselves
    and normalises; that step is kept, so the layer computes what the reference's does.
    """

    def __init__(self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.cross_attn = Attention(hidden_dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.ffn = FeedForward(hidden_dim, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)
        init_like_multihead_attention(self.cross_attn)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if self.training:  # a dropout mask per image, as for queries repeated over the batch
            queries = queries.expand(memory.shape[0], -1, -1)
        queries = self.norm1(queries + self.dropout(queries))
        attended = self.cross_attn(queries, memory, memory)  # (B, G, D)
        queries = self.norm2(queries + self.dropout(attended))
        return self.norm3(queries + self.dropout(self.ffn(queries)))


class GroupFullyConnected(nn.Module):
    """Each of G query outputs gives F = ceil(K / G) logits: (B, G, D) -> (B, K).

    The G·F logits are laid out query by query (label k comes from query k // F); the G·F − K
    left over at the end are dropped.
    """

    def __init__(self, num_groups: int, hidden_dim: int, num_classes: int) -> None:
        super().__init__()
        per_group = math.ceil(num_classes / num_groups)
        self.weight = nn.Parameter(torch.empty(num_groups, hidden_dim, per_group))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.xavier_normal_(self.weight)
        self.num_classes = num_classes

    def forward(self, group_features: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("bgd,gdf->bgf", group_features, self.weight)  # (B, G, F)
        return logits.flatten(1)[:, : self.num_classes] + self.bias  # (B, K)
