"""Exact mAP on a COCO-val-sized score matrix: q2l against sklearn and torchmetrics.

The matrix has COCO val2014's shape (40,137 images × 80 classes), about 2.9 positives per image
spread over classes as unevenly as COCO's (one class in ~45% of the images, the rarest in a few
dozen), float32 scores as `q2l.training.engine.evaluate` returns them, and a fifth of the rows
rounded to three decimals so tied scores occur. All three must agree on every class's AP to 1e-6.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.timing import Rates, Row, Workload, compare, interleaved
from q2l import metrics

COCO_VAL_IMAGES = 40_137
COCO_CLASSES = 80
POSITIVES_PER_IMAGE = 2.9
TOLERANCE = 1e-6


def coco_sized_problem(
    num_images: int = COCO_VAL_IMAGES, num_classes: int = COCO_CLASSES, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (N, K) float32 in (0, 1) and targets (N, K) int64 in {0, 1}."""
    generator = np.random.default_rng(seed)
    # Zipf-like class frequencies scaled to 2.9 positives per image, the most common capped at 45%.
    rates = 1.0 / np.arange(1, num_classes + 1) ** 1.1
    for _ in range(20):  # rescale until the capped rates sum to 2.9 again
        rates = np.minimum(rates * POSITIVES_PER_IMAGE / rates.sum(), 0.45)
    targets = generator.random((num_images, num_classes)) < rates
    logits = generator.normal(np.where(targets, 1.0, -1.5), 1.2)
    scores = 1.0 / (1.0 + np.exp(-logits))
    tied_rows = generator.random(num_images) < 0.2
    scores[tied_rows] = np.round(scores[tied_rows], 3)
    return torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(targets.astype(np.int64))


def _sklearn(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    from sklearn.metrics import average_precision_score  # 1 s to import: only where it runs

    return average_precision_score(targets, scores, average=None)


def _torchmetrics(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.classification import multilabel_average_precision

    return multilabel_average_precision(
        scores, targets, num_labels=scores.shape[1], average="none", thresholds=None
    )


def measure_exact_map(rounds: int, num_images: int = COCO_VAL_IMAGES) -> list[Row]:
    """Section b: seconds per exact mAP of the whole matrix, and the agreement check."""
    scores, targets = coco_sized_problem(num_images)
    scores_np, targets_np = scores.numpy(), targets.numpy()
    int_targets = targets.int()

    q2l_ap = metrics.average_precision(scores, targets).numpy()
    differences = {
        "sklearn": np.abs(q2l_ap - _sklearn(scores_np, targets_np)).max(),
        "torchmetrics": np.abs(q2l_ap - _torchmetrics(scores, int_targets).double().numpy()).max(),
    }
    for name, difference in differences.items():
        if not difference <= TOLERANCE:
            raise AssertionError(f"q2l AP differs from {name} by {difference:.2e} > {TOLERANCE}")

    def timed(fn) -> Workload:
        def run() -> int:
            fn()
            return 1

        return Workload(run)

    workloads = {
        "q2l": timed(lambda: metrics.average_precision(scores, targets)),
        "sklearn": timed(lambda: _sklearn(scores_np, targets_np)),
        "torchmetrics": timed(lambda: _torchmetrics(scores, int_targets)),
    }
    multithreaded = torch.get_num_threads() > 1
    if multithreaded:  # what q2l's one-thread metrics and torchmetrics' threads change
        workloads["q2l, default threads"] = timed(
            lambda: metrics.average_precision.__wrapped__(scores, targets)
        )
        workloads["torchmetrics, 1 thread"] = timed(
            lambda: _one_thread(_torchmetrics, scores, int_targets)
        )
    rates = interleaved(workloads, rounds)
    # torchmetrics runs on PyTorch's intra-op threads: its better thread setting, round by round.
    settings = [rates[name].samples for name in rates if name.startswith("torchmetrics")]
    torchmetrics_best = Rates([max(pair) for pair in zip(*settings, strict=True)])
    shape = f"{scores.shape[0]:,}×{scores.shape[1]}"
    rows = [
        compare(
            "b. exact mAP",
            f"AP {shape} vs sklearn",
            rates["q2l"],
            rates["sklearn"],
            "s",
            "sklearn average_precision_score",
            seconds=True,
            target=3.0,
            note=f"max |ΔAP| {differences['sklearn']:.1e}",
        ),
        compare(
            "b. exact mAP",
            f"AP {shape} vs torchmetrics exact",
            rates["q2l"],
            torchmetrics_best,
            "s",
            "torchmetrics thresholds=None"
            + (" (best of 1/default threads)" if multithreaded else ""),
            seconds=True,
            target=3.0,
            note=f"max |ΔAP| {differences['torchmetrics']:.1e}",
        ),
    ]
    if multithreaded:
        rows.append(
            compare(
                "levers",
                f"AP {shape}: default intra-op threads",
                rates["q2l, default threads"],
                rates["q2l"],
                "s",
                "q2l single_threaded",
                seconds=True,
            )
        )
    return rows


def _one_thread(fn, *args):
    with metrics.single_threaded():
        return fn(*args)
