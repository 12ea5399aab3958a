"""2-D sine positional encoding (DETR, Carion et al. 2020), as Query2Label uses it.

Unlike the official Query2Label code, which stores a buffer sized for one training resolution, the
encoding here is computed from the feature map it is given, so a model trained at 448 px evaluates
at 576 px unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SinePositionEncoding(nn.Module):
    """Normalised sine/cosine encoding of (row, column) positions.

    forward: features (B, C, H, W) -> positions (1, D, H, W), D = 2 * `num_pos_feats`;
    broadcast over the batch, in the dtype and device of `features`.

    Args:
        num_pos_feats: channels per axis (hidden_dim // 2 for the usual hidden_dim).
        temperature: frequency base of the sinusoids.
        scale: positions are normalised to [0, scale].
    """

    def __init__(
        self, num_pos_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        height, width = features.shape[-2:]
        device = features.device
        eps = 1e-6
        # Same normalisation as DETR's mask cumsum with no padding: positions 1..H over H.
        y_embed = torch.arange(1, height + 1, device=device, dtype=torch.float32)
        x_embed = torch.arange(1, width + 1, device=device, dtype=torch.float32)
        y_embed = y_embed / (height + eps) * self.scale
        x_embed = x_embed / (width + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, device=device, dtype=torch.float32)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )

        pos_y = _interleave_sin_cos(y_embed[:, None] / dim_t)  # (H, F)
        pos_x = _interleave_sin_cos(x_embed[:, None] / dim_t)  # (W, F)
        pos = torch.cat(
            [
                pos_y[:, None, :].expand(height, width, -1),
                pos_x[None, :, :].expand(height, width, -1),
            ],
            dim=-1,
        )  # (H, W, D)
        return pos.permute(2, 0, 1).unsqueeze(0).to(features.dtype)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """(N, F) angles -> (N, F): sin on even channels, cos on odd ones, interleaved as in DETR."""
    return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)
