"""Convergence: the default Query2Label head learns at least as well as global pooling + linear.

Trained from scratch here, global pooling + linear reaches 74.9 mAP and the default head (pre-norm,
no output LayerNorm, zero-initialised residual branches, dropout 0) 79.1. The official layout
(post-norm blocks, a final LayerNorm, dropout 0.1) reaches 67.4 from the official initialisation
(71.6 with dropout 0); before norm=post took that initialisation (Xavier over each of q/k/v
separately, default attention biases) it reached 52.9 (61.9). docs/heads.md has the diagnosis,
and where the heads stand from a pretrained backbone.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from q2l.demo.hard_digits import hard_digits
from q2l.losses import AsymmetricLoss
from q2l.metrics import mean_average_precision
from q2l.models import GlobalPoolLinear, Query2Label
from q2l.optim import build_adamw, build_onecycle

pytestmark = pytest.mark.slow

EPOCHS, BATCH = 6, 32


class TinyConvNet(nn.Module):
    """Three stride-2 conv stages: (B, 3, 32, 32) -> (B, 128, 4, 4), a 16-token feature map."""

    def __init__(self) -> None:
        super().__init__()
        layers, channels = [], 3
        for width in (32, 64, 128):
            layers += [
                nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.body = nn.Sequential(*layers)
        self.num_channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


@pytest.fixture(scope="module")
def data():
    return hard_digits(2000, 500, seed=0)


def val_map(head: nn.Module, data) -> float:
    """Train `head` for EPOCHS with the library's AdamW, OneCycle and ASL; val mAP in percent."""
    train_x, train_y, val_x, val_y = data

    def normalise(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - 0.45) / 0.25

    steps = len(train_x) // BATCH
    optimizer = build_adamw(head, lr=1e-3, fused=False)
    schedule = build_onecycle(optimizer, total_steps=EPOCHS * steps, steps_per_epoch=steps)
    loss_fn, order_rng = AsymmetricLoss(), torch.Generator().manual_seed(0)
    head.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(train_x), generator=order_rng)
        for step in range(steps):
            batch = order[step * BATCH : (step + 1) * BATCH]
            loss = loss_fn(head(normalise(train_x[batch])), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    head.eval()
    with torch.no_grad():
        scores = torch.sigmoid(head(normalise(val_x)))
    return 100 * mean_average_precision(scores, val_y)[0]


def test_default_query2label_learns_as_well_as_global_pooling_from_scratch(data):
    torch.set_num_threads(1)  # the same float reductions on every machine
    torch.manual_seed(0)
    pooled = val_map(GlobalPoolLinear(TinyConvNet(), 10), data)
    torch.manual_seed(0)
    query2label = val_map(Query2Label(TinyConvNet(), 10, hidden_dim=64, ffn_dim=256), data)
    # Measured 74.9 and 79.1; the official layout gets 67.4, so a 3-point margin catches it.
    assert query2label >= pooled - 3, (query2label, pooled)
