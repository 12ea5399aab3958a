"""Tests for q2l.metrics: AP against sklearn (ties, ignored labels, NaN classes), VOC AP against a
loop port of the official formula, thresholded and top-k counts against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from q2l.metrics import (
    average_precision,
    compute_metrics,
    mean_average_precision,
    threshold_metrics,
    topk_metrics,
    voc_average_precision,
)

from .helpers.reference import sklearn_ap

COUNTING_KEYS = {"CP", "CR", "CF1", "OP", "OR", "OF1"}


def _random_problem(
    num_samples: int = 300, num_classes: int = 7, seed: int = 0, decimals: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (N, K) that rank positives higher on average, and {0, 1} targets (N, K)."""
    generator = np.random.default_rng(seed)
    targets = (generator.random((num_samples, num_classes)) < 0.2).astype(np.int64)
    scores = generator.random((num_samples, num_classes)) * 0.7 + 0.3 * targets
    if decimals is not None:
        scores = np.round(scores, decimals)
    return torch.from_numpy(scores), torch.from_numpy(targets)


def _reference_voc_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """All-point interpolated VOC AP of one class, written out as in SSGRL/Query2Label `voc_ap`."""
    keep = targets != -1
    scores, targets = scores[keep], targets[keep]
    order = np.argsort(-scores, kind="stable")
    hits = targets[order] == 1
    true_positives = np.cumsum(hits)
    false_positives = np.cumsum(~hits)
    recall = np.concatenate(([0.0], true_positives / hits.sum(), [1.0]))
    precision = np.concatenate(
        ([0.0], true_positives / np.maximum(true_positives + false_positives, 1), [0.0])
    )
    for index in range(len(precision) - 1, 0, -1):
        precision[index - 1] = max(precision[index - 1], precision[index])
    changes = np.where(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[changes + 1] - recall[changes]) * precision[changes + 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_average_precision_matches_sklearn_with_many_ties(dtype: torch.dtype) -> None:
    scores, targets = _random_problem(decimals=1)
    scores = scores.to(dtype)
    assert scores.unique().numel() <= 11  # the test is only meaningful with heavy ties

    result = average_precision(scores, targets)

    assert result.dtype == torch.float64 and result.shape == (7,)
    np.testing.assert_allclose(result.numpy(), sklearn_ap(scores, targets), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_average_precision_matches_sklearn_without_ties(dtype: torch.dtype) -> None:
    scores, targets = _random_problem(seed=1)
    # Logits: negative scores exercise the sign handling of the float32 sort keys.
    scores = (torch.logit(scores.clamp(1e-4, 1 - 1e-4))).to(dtype)

    np.testing.assert_allclose(
        average_precision(scores, targets).numpy(), sklearn_ap(scores, targets), atol=1e-12
    )


def test_negative_and_positive_zero_are_one_tie() -> None:
    # Positives sit on +0.0: ranking +0.0 above -0.0 instead of tying them would raise their
    # precision.
    scores = torch.tensor([[0.0], [-0.0], [0.0], [-0.0], [-1.0], [1.0]])
    targets = torch.tensor([[1], [0], [1], [0], [1], [0]])

    np.testing.assert_allclose(
        average_precision(scores, targets).numpy(), sklearn_ap(scores, targets), atol=1e-12
    )


def test_class_without_positives_is_nan_and_left_out_of_the_mean() -> None:
    scores, targets = _random_problem(seed=2)
    targets[:, 3] = 0
    with_positives = [0, 1, 2, 4, 5, 6]

    per_class = average_precision(scores, targets)
    mean_ap, num_left_out = mean_average_precision(scores, targets)
    mean_voc_ap, num_voc_left_out = mean_average_precision(scores, targets, interpolated=True)

    assert torch.isnan(per_class[3]) and not torch.isnan(per_class[with_positives]).any()
    assert torch.isnan(voc_average_precision(scores, targets)[3])
    assert num_left_out == 1 and num_voc_left_out == 1
    expected = sklearn_ap(scores[:, with_positives], targets[:, with_positives]).mean()
    assert mean_ap == pytest.approx(expected, abs=1e-12)
    assert not math.isnan(mean_voc_ap)


def test_ignored_targets_equal_sklearn_on_the_masked_column() -> None:
    scores, targets = _random_problem(seed=3, decimals=2)
    unannotated = torch.from_numpy(np.random.default_rng(4).random(targets.shape) < 0.3)
    targets = targets.masked_fill(unannotated, -1)

    np.testing.assert_allclose(
        average_precision(scores, targets).numpy(), sklearn_ap(scores, targets), atol=1e-12
    )
    # Counting -1 as negative gives a different answer, so the mask is really applied.
    counted_as_negative = average_precision(scores, targets.clamp(min=0))
    assert not torch.allclose(counted_as_negative, average_precision(scores, targets))


def test_voc_average_precision_equals_reference_and_bounds_plain_ap() -> None:
    scores, targets = _random_problem(num_samples=200, num_classes=6, seed=5, decimals=1)
    targets[:40, 0] = -1

    voc = voc_average_precision(scores, targets)
    expected = [_reference_voc_ap(scores[:, k].numpy(), targets[:, k].numpy()) for k in range(6)]

    np.testing.assert_allclose(voc.numpy(), expected, rtol=0, atol=1e-12)
    assert (voc >= average_precision(scores, targets) - 1e-12).all()
    assert (voc > average_precision(scores, targets)).any()


def test_voc_average_precision_ranks_ties_in_input_order() -> None:
    tied = torch.full((2, 1), 0.5)

    positive_first = voc_average_precision(tied, torch.tensor([[1], [0]]))
    positive_last = voc_average_precision(tied, torch.tensor([[0], [1]]))

    assert positive_first.item() == pytest.approx(1.0)
    assert positive_last.item() == pytest.approx(0.5)


# Hand-worked example, 4 images × 4 classes. Predicted (score >= 0.5):
#   class 0: tp 1, fp 1, fn 1 -> P 1/2, R 1/2      class 1: tp 1, fp 1, fn 1 -> P 1/2, R 1/2
#   class 2: tp 0, fp 1, no positive -> P 0, not in CR
#   class 3: nothing predicted, one positive -> P 0, R 0
_HAND_SCORES = torch.tensor(
    [[0.9, 0.6, 0.1, 0.1], [0.4, 0.7, 0.2, 0.1], [0.8, 0.3, 0.6, 0.1], [0.1, 0.2, 0.3, 0.1]]
)
_HAND_TARGETS = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])


def test_threshold_metrics_match_hand_computed_values() -> None:
    metrics = threshold_metrics(_HAND_SCORES, _HAND_TARGETS, threshold=0.5)

    class_precision, class_recall = (0.5 + 0.5 + 0 + 0) / 4, (0.5 + 0.5 + 0) / 3
    assert metrics["CP"] == pytest.approx(class_precision)
    assert metrics["CR"] == pytest.approx(class_recall)
    assert metrics["CF1"] == pytest.approx(2 / 7)
    assert metrics["OP"] == pytest.approx(2 / 5)
    assert metrics["OR"] == pytest.approx(2 / 5)
    assert metrics["OF1"] == pytest.approx(2 / 5)


def test_cf1_is_harmonic_mean_of_cp_and_cr_not_mean_of_per_class_f1() -> None:
    metrics = threshold_metrics(_HAND_SCORES, _HAND_TARGETS)

    mean_per_class_f1 = (0.5 + 0.5 + 0 + 0) / 4
    harmonic = 2 * metrics["CP"] * metrics["CR"] / (metrics["CP"] + metrics["CR"])
    assert metrics["CF1"] == pytest.approx(harmonic)
    assert metrics["CF1"] != pytest.approx(mean_per_class_f1, abs=1e-3)


def test_threshold_metrics_ignore_unannotated_entries() -> None:
    # Image 2 predicts class 2 wrongly; once that entry is -1 the false positive disappears.
    targets = _HAND_TARGETS.clone()
    targets[2, 2] = -1

    metrics = threshold_metrics(_HAND_SCORES, targets)

    assert metrics["OP"] == pytest.approx(2 / 4)
    assert metrics["OR"] == pytest.approx(2 / 5)


def test_overall_precision_recall_equal_sklearn_micro() -> None:
    scores, targets = _random_problem(seed=6)

    metrics = threshold_metrics(scores, targets, threshold=0.6)

    from sklearn.metrics import precision_score, recall_score

    predictions = (scores >= 0.6).numpy().astype(int)
    assert metrics["OP"] == pytest.approx(
        precision_score(targets.numpy(), predictions, average="micro")
    )
    assert metrics["OR"] == pytest.approx(
        recall_score(targets.numpy(), predictions, average="micro")
    )


def _literature_topk(scores: np.ndarray, targets: np.ndarray, k: int, threshold: float) -> dict:
    """The top-k metrics as ML-GCN's `overall_topk` + `evaluation` compute them (the convention of
    the published tables), written out as plain loops: a class is predicted for an image when it
    is among the image's k highest scores and its score is at least `threshold`."""
    num_images, num_classes = scores.shape
    predicted = np.zeros_like(targets)
    for image in range(num_images):
        for label in np.argsort(-scores[image], kind="stable")[:k]:
            predicted[image, label] = scores[image, label] >= threshold
    correct = (predicted * targets).sum(0).astype(float)
    predictions = np.maximum(predicted.sum(0), 1).astype(float)
    positives = targets.sum(0).astype(float)
    op, recall_o = correct.sum() / predictions.sum(), correct.sum() / positives.sum()
    cp, recall_c = (correct / predictions).mean(), (correct / positives).mean()
    return {
        "CP": cp,
        "CR": recall_c,
        "CF1": 2 * cp * recall_c / (cp + recall_c),
        "OP": op,
        "OR": recall_o,
        "OF1": 2 * op * recall_o / (op + recall_o),
    }


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_top3_metrics_follow_the_literature(threshold: float) -> None:
    scores, targets = _random_problem(num_samples=400, num_classes=9, seed=3)
    assert (targets.sum(0) > 0).all()  # the reference's recall divides by every class's positives
    reference = _literature_topk(scores.numpy(), targets.numpy(), 3, threshold)
    metrics = topk_metrics(scores, targets, k=3, threshold=threshold)
    for name in COUNTING_KEYS:
        assert metrics[name] == pytest.approx(reference[name], abs=1e-12), name
    # Counting all three top classes whatever their score differs: more predictions, lower CP.
    every_top3 = topk_metrics(scores, targets, k=3, threshold=None)
    assert every_top3["CP"] < metrics["CP"] and every_top3["CR"] >= metrics["CR"]


def test_top3_metrics_match_hand_computed_values() -> None:
    # Top 3 of image 0: classes 0, 1, 2; of image 1: classes 1, 2, 3.
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.5, 0.4, 0.3, 0.2]])
    targets = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 1]])

    # All three count, low scores too. Per class P: 1, 1/2, 0, 0, 0; R (classes with positives
    # 0, 1, 3, 4): 1, 1, 0, 0.
    every = topk_metrics(scores, targets, k=3, threshold=None)
    assert every["CP"] == pytest.approx(0.3)
    assert every["CR"] == pytest.approx(0.5)
    assert every["CF1"] == pytest.approx(0.375)
    assert every["OP"] == pytest.approx(2 / 6)
    assert every["OR"] == pytest.approx(2 / 4)
    assert every["OF1"] == pytest.approx(0.4)

    # At threshold 0.5 only (0, 0), (0, 1), (0, 2) and (1, 1) stay predicted: P 1, 1/2, 0, 0, 0;
    # R 1, 1, 0, 0; overall 2 of 4 predictions right, 2 of 4 positives found.
    literature = topk_metrics(scores, targets, k=3, threshold=0.5)
    assert literature["CP"] == pytest.approx(0.3)
    assert literature["CR"] == pytest.approx(0.5)
    assert literature["OP"] == pytest.approx(2 / 4)
    assert literature["OR"] == pytest.approx(2 / 4)


def test_compute_metrics_reports_percent_with_named_keys() -> None:
    scores, targets = _random_problem(seed=7)
    targets[:, 2] = 0

    report = compute_metrics(scores, targets, threshold=0.5, top_k=3)

    assert set(report) == (
        {"mAP", "mAP_voc", "num_classes_without_positives"}
        | COUNTING_KEYS
        | {f"{name}_top3" for name in COUNTING_KEYS}
        | {f"{name}_top3_all" for name in COUNTING_KEYS}
    )
    assert report["num_classes_without_positives"] == 1
    assert report["mAP"] == pytest.approx(100 * mean_average_precision(scores, targets)[0])
    assert report["mAP_voc"] == pytest.approx(
        100 * mean_average_precision(scores, targets, interpolated=True)[0]
    )
    thresholded, top = threshold_metrics(scores, targets), topk_metrics(scores, targets, k=3)
    top_all = topk_metrics(scores, targets, k=3, threshold=None)
    for name in COUNTING_KEYS:
        assert report[name] == pytest.approx(100 * thresholded[name])
        assert report[f"{name}_top3"] == pytest.approx(100 * top[name])
        assert report[f"{name}_top3_all"] == pytest.approx(100 * top_all[name])
    assert 1 < report["mAP"] <= 100


@pytest.mark.parametrize(
    ("scores", "targets", "message"),
    [
        (torch.rand(4, 3), torch.zeros(4, 2), "does not match"),
        (torch.rand(4), torch.zeros(4), "2-D"),
        (torch.rand(4, 3), torch.full((4, 3), 2), "targets must contain"),
        (torch.rand(4, 3), torch.full((4, 3), 0.5), "targets must contain"),
        (torch.full((4, 3), math.nan), torch.zeros(4, 3), "NaN"),
        (torch.rand(0, 3), torch.zeros(0, 3), "at least one sample"),
    ],
)
def test_bad_inputs_raise_value_error(
    scores: torch.Tensor, targets: torch.Tensor, message: str
) -> None:
    for metric in (average_precision, voc_average_precision, threshold_metrics, compute_metrics):
        with pytest.raises(ValueError, match=message):
            metric(scores, targets)


def test_top_k_outside_the_class_count_raises() -> None:
    with pytest.raises(ValueError, match="k must be between"):
        topk_metrics(torch.rand(4, 3), torch.zeros(4, 3), k=4)
