"""Per-class thresholds: the F1 rule against a brute-force search, and per-class counts."""

from __future__ import annotations

import torch

from q2l.evaluation.calibration import f1_thresholds, per_class_counts, precision_recall_curve
from q2l.metrics import threshold_metrics


def _brute_force(scores: torch.Tensor, targets: torch.Tensor, fallback: float):
    """Try every distinct annotated score of every class; keep the best F1, ties to the highest."""
    thresholds, best_f1 = [], []
    for k in range(scores.shape[1]):
        annotated = targets[:, k] != -1
        column, truth = scores[annotated, k].tolist(), targets[annotated, k].tolist()
        positives = sum(1 for t in truth if t == 1)
        if positives == 0:
            thresholds.append(fallback)
            best_f1.append(0.0)
            continue
        best = (-1.0, None)
        for threshold in sorted(set(column), reverse=True):
            tp = sum(1 for s, t in zip(column, truth, strict=True) if s >= threshold and t == 1)
            fp = sum(1 for s, t in zip(column, truth, strict=True) if s >= threshold and t == 0)
            f1 = 2 * tp / (tp + fp + positives)
            if f1 > best[0]:  # strictly better: an equal F1 at a lower threshold loses
                best = (f1, threshold)
        thresholds.append(best[1])
        best_f1.append(best[0])
    return torch.tensor(thresholds, dtype=torch.float64), torch.tensor(best_f1, dtype=torch.float64)


def test_f1_thresholds_equal_brute_force_with_ties_and_ignored_entries():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        num_images, num_classes = 30, 6
        # Coarse scores make many ties, between images and between F1 values.
        scores = torch.randint(0, 8, (num_images, num_classes), generator=generator) / 8.0
        targets = torch.randint(0, 2, (num_images, num_classes), generator=generator)
        targets[torch.rand(num_images, num_classes, generator=generator) < 0.15] = -1
        targets[:, 0] = torch.where(targets[:, 0] == 1, 0, targets[:, 0])  # no positive
        if trial % 2:
            targets[:, 1] = 1  # only positives: the lowest score wins
        result = f1_thresholds(scores, targets, fallback=0.4)
        expected_thresholds, expected_f1 = _brute_force(scores, targets, 0.4)
        assert torch.equal(result.thresholds, expected_thresholds), trial
        assert torch.allclose(result.f1, expected_f1), trial
        assert not result.calibrated[0] and result.calibrated[2:].all()


def test_the_chosen_thresholds_reproduce_the_best_f1():
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(200, 5, generator=generator)
    targets = (torch.rand(200, 5, generator=generator) < scores).long()
    result = f1_thresholds(scores.float(), targets)
    counts = per_class_counts(scores, targets, result.thresholds)
    assert torch.allclose(counts["f1"], result.f1)
    # No single threshold beats the per-class ones on any class.
    for threshold in torch.linspace(0, 1, 21):
        assert (
            per_class_counts(scores, targets, float(threshold))["f1"] <= result.f1 + 1e-12
        ).all()
    # threshold_metrics accepts per-class thresholds (broadcast over images).
    overall = threshold_metrics(scores, targets, result.thresholds)
    predicted = counts["predicted"].sum().item()
    assert abs(overall["OP"] - counts["true_positives"].sum().item() / predicted) < 1e-12


def test_per_class_counts_edge_cases():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.3]])
    targets = torch.tensor([[1, 0], [0, -1]])
    counts = per_class_counts(scores, targets, 0.5)
    assert counts["positives"].tolist() == [1, 0]
    assert counts["precision"].tolist() == [1.0, 0.0]
    assert counts["f1"][0] == 1.0 and counts["f1"][1].isnan()  # no positive: F1 undefined


def test_precision_recall_curve_steps_over_distinct_scores():
    precision, recall = precision_recall_curve(
        torch.tensor([0.9, 0.8, 0.8, 0.1, 0.5]), torch.tensor([1, 0, 1, 0, -1])
    )
    assert precision.tolist() == [1.0, 2 / 3, 0.5]
    assert recall.tolist() == [0.5, 1.0, 1.0]
