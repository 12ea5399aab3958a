"""Reference results the tests compare q2l against."""

from __future__ import annotations

import numpy as np
import torch


def sklearn_ap(scores: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """(K,) per-class sklearn AP of (N, K) scores, dropping each column's -1 entries."""
    from sklearn.metrics import average_precision_score  # 1 s to import: not at collection

    scores_np, targets_np = scores.to(torch.float64).numpy(), targets.numpy()
    per_class = []
    for column in range(scores_np.shape[1]):
        keep = targets_np[:, column] != -1
        per_class.append(average_precision_score(targets_np[keep, column], scores_np[keep, column]))
    return np.array(per_class)
