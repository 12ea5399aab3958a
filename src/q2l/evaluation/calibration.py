"""Per-class decision thresholds and per-class counts: pure functions of (N, K) scores and targets.

N images, K classes; `scores` are probabilities, `targets` 1 (positive), 0 (negative) or -1 (not
annotated, left out of its class as in q2l.metrics). A class is predicted when its score is at or
above its threshold (`scores >= thresholds`), the rule every q2l metric and `q2l-predict` use.

The F1 rule (`f1_thresholds`):
- candidates are the class's own annotated scores: at threshold t = s_i, every image scoring at
  least s_i is predicted, so the choice reproduces exactly the predictions that maximised F1;
- among thresholds with equal F1 the highest wins (the fewest predictions for the same F1);
- a class without an annotated positive has F1 = 0 at every threshold, so nothing can be learnt
  from it: it keeps the fallback threshold (the run's trainer.threshold) and is reported.
Thresholds chosen on a split are optimistic on that split; choose them on validation data and
report on held-out data (docs/inference.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Calibration(NamedTuple):
    """Result of `f1_thresholds`; all (K,)."""

    thresholds: Tensor  # float64: the chosen threshold of each class
    f1: Tensor  # float64: F1 at that threshold on the calibration split (0 without positives)
    calibrated: Tensor  # bool: False where the class had no positive and kept the fallback


def f1_thresholds(scores: Tensor, targets: Tensor, fallback: float = 0.5) -> Calibration:
    """Each class's threshold of maximum F1 on (scores, targets), ties to the highest threshold.

    Args:
        scores: (N, K) probabilities.
        targets: (N, K) with values in {-1, 0, 1}; -1 entries are ignored.
        fallback: threshold of a class without annotated positives.
    """
    scores, targets = _check(scores, targets)
    # Ignored entries sink below every annotated score, so they never split a group of equal
    # annotated scores and never become a threshold.
    scores = scores.masked_fill(targets == -1, float("-inf"))
    order = scores.argsort(dim=0, descending=True, stable=True)  # (N, K)
    sorted_scores = scores.gather(0, order)
    sorted_targets = targets.gather(0, order)
    true_positives = (sorted_targets == 1).cumsum(0).to(torch.float64)
    false_positives = (sorted_targets == 0).cumsum(0).to(torch.float64)
    positives = true_positives[-1]  # (K,)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P): one correctly rounded division of exact
    # integers, so thresholds with equal F1 tie exactly and the tie rule decides.
    f1 = 2 * true_positives / (true_positives + false_positives + positives).clamp_min(1)
    # A cut is valid at the last image of a group of equal scores (all of them are predicted
    # together), and never among the ignored entries at the bottom.
    group_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    group_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    f1 = f1.masked_fill(~group_end | (sorted_targets == -1), -1.0)
    best = f1.argmax(dim=0)  # the first maximum: the highest threshold among ties
    calibrated = positives > 0
    thresholds = sorted_scores.gather(0, best[None]).squeeze(0).to(torch.float64)
    thresholds = torch.where(calibrated, thresholds, torch.full_like(thresholds, fallback))
    best_f1 = torch.where(calibrated, f1.gather(0, best[None]).squeeze(0), 0.0)
    return Calibration(thresholds, best_f1, calibrated)


def per_class_counts(
    scores: Tensor, targets: Tensor, thresholds: Tensor | float
) -> dict[str, Tensor]:
    """Per-class counts and rates with `scores >= thresholds` predicted.

    Args:
        scores: (N, K) probabilities.
        targets: (N, K) with values in {-1, 0, 1}; -1 entries are ignored.
        thresholds: one threshold, or (K,) per class.

    Returns:
        (K,) tensors: positives, predicted, true_positives (int64); precision (0 when nothing is
        predicted), recall and F1 (NaN without positives; F1 0 when precision and recall are 0),
        float64.
    """
    scores, targets = _check(scores, targets)
    predicted = (scores >= torch.as_tensor(thresholds, dtype=scores.dtype)) & (targets != -1)
    positive = targets == 1
    true_positives = (predicted & positive).sum(0)
    num_predicted = predicted.sum(0)
    num_positives = positive.sum(0)
    precision = true_positives / num_predicted.clamp_min(1).to(torch.float64)
    recall = true_positives / num_positives.to(torch.float64)  # NaN where there is no positive
    total = precision + recall
    f1 = torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-300), 0.0)
    f1 = f1.masked_fill(recall.isnan(), float("nan"))
    return {
        "positives": num_positives,
        "predicted": num_predicted,
        "true_positives": true_positives,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def precision_recall_curve(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Precision and recall of one class at each distinct score, from the highest down.

    Args:
        scores: (N,) probabilities of one class.
        targets: (N,) in {-1, 0, 1}; -1 entries are ignored.

    Returns:
        (precision, recall), each (T,) float64 for the T distinct annotated scores; empty when
        the class has no annotated image. Recall is NaN without positives.
    """
    keep = targets != -1
    scores, targets = scores[keep].to(torch.float64), targets[keep]
    order = scores.argsort(descending=True, stable=True)
    scores, targets = scores[order], targets[order]
    true_positives = (targets == 1).cumsum(0).to(torch.float64)
    predicted = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    group_end = torch.ones_like(scores, dtype=torch.bool)
    group_end[:-1] = scores[:-1] != scores[1:]
    precision = (true_positives / predicted)[group_end]
    recall = (true_positives / true_positives[-1:])[group_end]  # 0/0 = NaN without positives
    return precision, recall


def _check(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    if scores.ndim != 2 or targets.shape != scores.shape:
        raise ValueError(
            f"scores and targets must both be (N, K), got {tuple(scores.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if scores.isnan().any():
        raise ValueError("scores contain NaN")
    return scores.detach().to(torch.float64), targets.detach().to(torch.int8)
