"""Transformer encoder/decoder for Query2Label (DETR lineage), in two layouts.

- norm="pre" (q2l's default): pre-norm blocks, x + f(LayerNorm(x)); no LayerNorm on the encoder's
  or the decoder's output; the last linear of each encoder branch and of each decoder FFN starts at
  zero, so the encoder is the identity at step 0. A LayerNorm between the image features and the
  per-label classifiers lets the head's output collapse to an image-independent vector during
  warm-up and starves the backbone's gradient; docs/heads.md has the measurements.
- norm="post": the official Query2Label (DETR) layout, post-norm blocks and a final decoder
  LayerNorm, for the paper presets and imported official checkpoints. It also starts from the
  official initialisation: the official code builds its attention from nn.MultiheadAttention, so
  Xavier-uniform runs over each packed (3D, D) q/k/v projection (a narrower range than over three
  (D, D) ones) and every attention bias starts at zero; other matrices are Xavier-uniform and the
  FFN biases keep nn.Linear's default, as there.

Batch-first throughout and built on `F.scaled_dot_product_attention`, so PyTorch picks the fused
attention kernel for the device. The decoder's self-attention can be removed, as the Query2Label
paper does by default: label queries then attend only to the image. Which layers keep it follows
the official code's two flags (`--keep_first_self_attn_dec`, `--keep_other_self_attn_dec`):
"none", "first", "rest" or "all".

Shape legend: B batch, N = H·W image tokens, K label queries, D hidden.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from q2l.utils.errors import ConfigError


class Transformer(nn.Module):
    """Encoder over image tokens, decoder with label queries.

    forward: memory (B, N, D), pos (1|B, N, D), query_pos (K, D) -> (B, K, D)

    Args:
        hidden_dim: token width D.
        num_heads: attention heads (D must divide evenly).
        num_encoder_layers: 0 feeds the projected features straight to the decoder.
        num_decoder_layers: at least 1.
        ffn_dim: width of the feed-forward layers.
        dropout: dropout on attention weights, residual branches and FFN.
        decoder_self_attention: which decoder layers keep self-attention among label queries:
            "none" (the paper), "first", "rest" (all but the first) or "all"; True/False mean
            "all"/"none".
        norm: "pre" (pre-norm, no output LayerNorms, zero-initialised residual branches) or
            "post" (the official layout); see the module docstring.
    """

    def __init__(
        self,
        hidden_dim: int = 2048,
        num_heads: int = 4,
        num_encoder_layers: int = 1,
        num_decoder_layers: int = 2,
        ffn_dim: int = 8192,
        dropout: float = 0.1,
        decoder_self_attention: str | bool = "none",
        norm: str = "pre",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"norm={norm!r}: choose pre or post")
        pre = norm == "pre"
        keep_self_attention = decoder_self_attention_layers(
            decoder_self_attention, num_decoder_layers
        )
        if num_decoder_layers < 1:
            raise ConfigError(f"num_decoder_layers must be >= 1, got {num_decoder_layers}")
        if hidden_dim % num_heads:
            raise ConfigError(f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}")
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(hidden_dim, num_heads, ffn_dim, dropout, pre)
            for _ in range(num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(hidden_dim, num_heads, ffn_dim, dropout, keep, pre)
            for keep in keep_self_attention
        )
        # Post-norm's final LayerNorm; pre-norm feeds the classifiers the residual stream.
        self.decoder_norm = nn.Identity() if pre else nn.LayerNorm(hidden_dim)
        self._reset_parameters(official=not pre)

    def _reset_parameters(self, official: bool) -> None:
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        if official:
            for module in self.modules():
                if isinstance(module, Attention):
                    init_like_multihead_attention(module)
            return
        # Residual branches that start at zero: the encoder is the identity and each decoder FFN a
        # no-op at step 0, so the backbone first trains under a near-linear head (as under global
        # pooling + linear) instead of random layers. The decoder's cross-attention keeps its
        # init: the queries start at zero and it is their only input.
        last_linears = [layer.self_attn.out_proj for layer in self.encoder_layers]
        last_linears += [layer.ffn[-1] for layer in [*self.encoder_layers, *self.decoder_layers]]
        for linear in last_linears:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        for layer in self.encoder_layers:
            memory = layer(memory, pos)
        memory_keys = memory + pos  # keys carry positions, values do not; the same for every layer
        # Queries start at zero; the label embedding enters as the query position (as in DETR/Q2L).
        # Both are the same for every image, so they stay (1, K, D) and broadcast: the first layer
        # projects its K queries once instead of once per image.
        query_pos = query_pos.unsqueeze(0)  # (1, K, D)
        queries = torch.zeros_like(query_pos)  # (1, K, D), then (B, K, D) after the first layer
        for layer in self.decoder_layers:
            queries = layer(queries, memory_keys, memory, query_pos)
        return self.decoder_norm(queries)


SELF_ATTENTION_CHOICES = ("none", "first", "rest", "all")
NORMS = ("pre", "post")


def decoder_self_attention_layers(choice: str | bool, num_layers: int) -> list[bool]:
    """Which of `num_layers` decoder layers keep self-attention, for a `decoder_self_attention`
    choice (one of SELF_ATTENTION_CHOICES; True/False and "true"/"false" mean "all"/"none")."""
    text = str(choice).lower()
    text = {"true": "all", "false": "none"}.get(text, text)
    if text not in SELF_ATTENTION_CHOICES:
        raise ConfigError(
            f"decoder_self_attention={choice!r}: choose one of {', '.join(SELF_ATTENTION_CHOICES)}"
        )
    return [
        text == "all" or (text == "first" and index == 0) or (text == "rest" and index > 0)
        for index in range(num_layers)
    ]


class Attention(nn.Module):
    """Multi-head attention: (1|B, Lq, D), (B, Lk, D), (B, Lk, D) -> (B, Lq, D).

    A query with batch size 1 is projected once and shared by every image.
    """

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_dim, hidden_dim)
        self.k_proj = nn.Linear(hidden_dim, hidden_dim)
        self.v_proj = nn.Linear(hidden_dim, hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        batch, (length, dim) = key.shape[0], query.shape[1:]
        q = self.split_heads(self.q_proj(query)).expand(batch, -1, -1, -1)
        k = self.split_heads(self.k_proj(key))
        v = self.split_heads(self.v_proj(value))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, h, Lq, D/h)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, h, L, D/h)."""
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)


def init_like_multihead_attention(attention: Attention) -> None:
    """nn.MultiheadAttention's initialisation (which the official Query2Label and ML-Decoder layers
    start from): Xavier-uniform over the packed (3D, D) q/k/v projection, i.e. each of q_proj,
    k_proj, v_proj uniform in ±sqrt(6 / 4D), and zero q/k/v and output biases. The output
    projection's weight is left as it is (Xavier-uniform over (D, D) in both official codes)."""
    dim = attention.q_proj.in_features
    bound = math.sqrt(6.0 / (dim + 3 * dim))
    for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
        nn.init.uniform_(projection.weight, -bound, bound)
        nn.init.zeros_(projection.bias)
    nn.init.zeros_(attention.out_proj.bias)


class FeedForward(nn.Sequential):
    """Linear -> ReLU -> dropout -> Linear: (..., D) -> (..., D)."""

    def __init__(self, hidden_dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(hidden_dim, ffn_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, hidden_dim),
        )


def _self_attention(attention: Attention, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Self-attention with positions on the queries and keys only: (B, L, D) -> (B, L, D)."""
    query_key = x + pos
    return attention(query_key, query_key, x)


class _Sublayers(nn.Module):
    """What encoder and decoder layers share: one residual sub-layer in either layout."""

    pre_norm: bool
    dropout: nn.Dropout

    def residual(
        self,
        x: torch.Tensor,
        norm: nn.LayerNorm,
        branch: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Pre-norm x + f(norm(x)), or post-norm norm(x + f(x)), with dropout on f."""
        if self.pre_norm:
            return x + self.dropout(branch(norm(x)))
        return norm(x + self.dropout(branch(x)))


class EncoderLayer(_Sublayers):
    """Pre- or post-norm self-attention + FFN over image tokens: (B, N, D) -> (B, N, D)."""

    def __init__(
        self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float, pre_norm: bool
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = Attention(hidden_dim, num_heads, dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.ffn = FeedForward(hidden_dim, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        src = self.residual(src, self.norm1, lambda x: _self_attention(self.self_attn, x, pos))
        return self.residual(src, self.norm2, self.ffn)


class DecoderLayer(_Sublayers):
    """Pre- or post-norm [self-attention +] cross-attention + FFN for label queries:
    (B, K, D) -> (B, K, D)."""

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        self_attention: bool,
        pre_norm: bool,
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = Attention(hidden_dim, num_heads, dropout) if self_attention else None
        self.norm1 = nn.LayerNorm(hidden_dim) if self_attention else None
        self.cross_attn = Attention(hidden_dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.ffn = FeedForward(hidden_dim, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        memory_keys: torch.Tensor,
        memory: torch.Tensor,
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        """queries (1|B, K, D), memory_keys = memory + pos (B, N, D), memory (B, N, D),
        query_pos (1, K, D) -> (B, K, D)."""
        if self.self_attn is not None:
            queries = self.residual(
                queries,
                self.norm1,
                lambda x: _self_attention(self.self_attn, x, query_pos),
            )
        queries = self.residual(  # (B, K, D)
            queries, self.norm2, lambda x: self.cross_attn(x + query_pos, memory_keys, memory)
        )
        return self.residual(queries, self.norm3, self.ffn)
