"""Where each label query looks: the last decoder layer's cross-attention weights of Query2Label.

`F.scaled_dot_product_attention` returns no weights, and the training and inference path keeps
that fused kernel. The maps are computed only while `CrossAttentionMaps` is active: forward hooks
capture the inputs of the last decoder layer's cross-attention (and the feature grid's size), and
`attention_weights` re-runs that layer's query and key projections on them to form
softmax(Q K^T / sqrt(d)) explicitly, the weights SDPA applied inside. Outside the context manager
no hook is registered and the forward pass is the plain one.

Shape legend: B batch, K label queries, N = H'·W' image tokens, h heads, D hidden.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from q2l.models.transformer import Attention


class CrossAttentionMaps:
    """Context manager recording each forward pass's label-to-image attention of `model`.

    After a forward pass inside the context, `maps` is (B, K, H', W') float32: for each image and
    label, the last decoder layer's cross-attention over the feature grid, averaged over heads
    (each row sums to 1 over H'·W'); `per_head` keeps the heads, (B, h, K, H', W').

    Args:
        model: a Query2Label (uses its `input_proj` and `transformer.decoder_layers[-1]`).
    """

    def __init__(self, model: nn.Module) -> None:
        if not hasattr(model, "transformer"):  # the GAP baseline, ML-Decoder (group queries)
            raise ValueError(
                f"attention maps need one query per label: a Query2Label (model=q2l), not a "
                f"{type(model).__name__}"
            )
        self.model = model
        self.per_head: torch.Tensor | None = None
        self._grid: tuple[int, int] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def maps(self) -> torch.Tensor:
        if self.per_head is None:
            raise RuntimeError("no forward pass has run inside CrossAttentionMaps yet")
        return self.per_head.mean(dim=1)

    def __enter__(self) -> CrossAttentionMaps:
        cross_attention = self.model.transformer.decoder_layers[-1].cross_attn
        self._handles = [
            self.model.input_proj.register_forward_hook(self._record_grid),
            cross_attention.register_forward_hook(self._record_weights),
        ]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record_grid(self, module: nn.Module, inputs: tuple, features: torch.Tensor) -> None:
        self._grid = tuple(features.shape[-2:])  # (H', W') of the projected features

    def _record_weights(self, module: Attention, inputs: tuple, output: torch.Tensor) -> None:
        query, key, _ = inputs  # (1|B, K, D), (B, N, D): as the layer received them
        weights = attention_weights(module, query, key)  # (B, h, K, N)
        height, width = self._grid
        self.per_head = weights.unflatten(-1, (height, width)).detach()


def attention_weights(attention: Attention, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) of `attention` for these inputs: (B, h, Lq, Lk) float32.

    query (1|B, Lq, D), key (B, Lk, D), as `Attention.forward` receives them; the projections are
    the module's own, so the weights are exactly those its SDPA call applied (dropout aside: in
    training, SDPA drops some of them at random).
    """
    batch = key.shape[0]
    q = attention.split_heads(attention.q_proj(query)).float()  # (1|B, h, Lq, d)
    k = attention.split_heads(attention.k_proj(key)).float()  # (B, h, Lk, d)
    scores = q.expand(batch, -1, -1, -1) @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1)
