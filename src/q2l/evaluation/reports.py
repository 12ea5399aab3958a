"""An evaluation's report: the printed text, and the files beside eval.json (the per-class table,
the precision-recall curves and, on request, every image's scores).

- per_class.csv: class, AP, positives, then threshold / precision / recall / F1 / predicted at
  the run's threshold and, when there are calibrated thresholds, at those;
- pr_curves.png: one precision-recall plot per class (q2l.utils.drawing), its AP in the title and
  the operating points at the run's threshold and at the calibrated thresholds marked;
- scores.npz (save_scores=true): image_ids (N,), class_names (K,), scores (N, K) float32,
  targets (N, K) int8; plain arrays, `numpy.load(path)` reads it without pickle.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from q2l.evaluation.calibration import per_class_counts, precision_recall_curve
from q2l.utils.atomic import atomic_write
from q2l.utils.precision_recall_plot import OperatingPoint, PrecisionRecallGrid, PRPanel

# Beyond this many classes the PNG would be a poster nobody reads; the CSV still has them all.
MAX_PLOTTED_CLASSES = 100


def write_per_class_csv(
    path: Path,
    class_names: list[str],
    average_precision: torch.Tensor,
    at_threshold: dict[str, torch.Tensor],
    threshold: float,
    calibrated: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """The per-class table. `at_threshold`/`calibrated[0]` are
    q2l.evaluation.calibration.per_class_counts results; `calibrated[1]` the (K,) calibrated
    thresholds. AP and rates in percent."""
    header = ["class", "AP", "positives", *_columns("")]
    if calibrated is not None:
        header += _columns("_calibrated")
    with atomic_write(path, "w") as handle:
        table = csv.writer(handle)
        table.writerow(header)
        for k, name in enumerate(class_names):
            row = [name, _percent(average_precision[k]), int(at_threshold["positives"][k])]
            row += _counts(at_threshold, k, threshold)
            if calibrated is not None:
                row += _counts(calibrated[0], k, float(calibrated[1][k]))
            table.writerow(row)


def _columns(suffix: str) -> list[str]:
    return [f"{name}{suffix}" for name in ("threshold", "precision", "recall", "F1", "predicted")]


def _counts(counts: dict[str, torch.Tensor], k: int, threshold: float) -> list:
    return [
        f"{threshold:.6g}",
        _percent(counts["precision"][k]),
        _percent(counts["recall"][k]),
        _percent(counts["f1"][k]),
        int(counts["predicted"][k]),
    ]


def _percent(value: torch.Tensor | float) -> str:
    value = float(value)
    return "" if math.isnan(value) else f"{100 * value:.2f}"


def write_pr_curves(
    path: Path,
    scores: torch.Tensor,
    targets: torch.Tensor,
    class_names: list[str],
    average_precision: torch.Tensor,
    threshold: float,
    calibrated_thresholds: torch.Tensor | None = None,
) -> PrecisionRecallGrid:
    """pr_curves.png for the first MAX_PLOTTED_CLASSES classes, each curve marked where the run's
    `threshold` and the (K,) `calibrated_thresholds` (if any) put it; returns the figure drawn
    (its `panels` are the classes plotted, `point` finds a pixel)."""
    shown = min(len(class_names), MAX_PLOTTED_CLASSES)
    run_points = operating_points(scores[:, :shown], targets[:, :shown], threshold)
    calibrated_points = [None] * shown
    if calibrated_thresholds is not None:
        calibrated_points = operating_points(
            scores[:, :shown], targets[:, :shown], calibrated_thresholds[:shown]
        )
    panels = []
    for k in range(shown):
        precision, recall = precision_recall_curve(scores[:, k], targets[:, k])
        panels.append(
            PRPanel(
                name=class_names[k],
                precision=precision.numpy(),
                recall=recall.numpy(),
                average_precision=100 * float(average_precision[k]),
                run_point=run_points[k],
                calibrated_point=calibrated_points[k],
            )
        )
    figure = PrecisionRecallGrid(panels, run_threshold=threshold)
    with atomic_write(path) as handle:
        figure.draw().save(handle, format="PNG")
    return figure


def operating_points(
    scores: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor | float
) -> list[OperatingPoint]:
    """Each class's precision and recall at its threshold (`scores >= threshold` predicted),
    the numbers per_class.csv reports: (N, K) scores and targets, one or (K,) thresholds."""
    counts = per_class_counts(scores, targets, thresholds)
    every = torch.as_tensor(thresholds, dtype=torch.float64).expand(scores.shape[1])
    return [
        OperatingPoint(
            threshold=float(every[k]),
            precision=float(counts["precision"][k]),
            recall=float(counts["recall"][k]),
            predicted=int(counts["predicted"][k]),
        )
        for k in range(scores.shape[1])
    ]


def write_scores(
    path: Path,
    image_ids: list[str],
    class_names: list[str],
    scores: torch.Tensor,
    targets: torch.Tensor,
) -> None:
    """scores.npz: every image's scores with its id and targets (no pickled objects)."""
    with atomic_write(path) as handle:
        np.savez_compressed(
            handle,
            image_ids=np.array(image_ids, dtype=str),
            class_names=np.array(class_names, dtype=str),
            scores=scores.float().numpy(),
            targets=targets.to(torch.int8).numpy(),
        )


def format_report(result: dict[str, Any]) -> str:
    """Overall metrics (a second column at per-class thresholds, when there are), then the
    per-class table: AP, positives, precision/recall/F1 at the threshold(s), as fixed-width text."""
    metrics = result["metrics"]
    calibrated = result.get("calibrated")
    tuned = calibrated["metrics"] if calibrated else {}
    lines = [
        f"checkpoint {result['checkpoint']} ({result['weights']} weights, epoch {result['epoch']})",
        f"data set   {result['dataset']}: {result['num_images']} images, threshold "
        f"{result['threshold']}",
    ]
    if calibrated:
        lines.append(f"per-class thresholds: {calibrated['source']}")
    header = f"{'metric':<12}{'value':>8}" + (f"{'per-class':>11}" if tuned else "")
    lines += ["", header]
    for key, value in metrics.items():
        if key != "num_classes_without_positives":
            other = f"{tuned[key]:>11.2f}" if key in tuned else ""
            lines.append(f"{key:<12}{value:>8.2f}{other}")
    if metrics.get("num_classes_without_positives"):
        lines.append(
            f"({metrics['num_classes_without_positives']} classes without positives left out of "
            "mAP)"
        )
    return "\n".join(lines + [""] + _per_class_lines(result))


def _per_class_lines(result: dict[str, Any]) -> list[str]:
    """The per-class table; P/R/F1 at the run's threshold, then (*) at per-class thresholds."""
    rows = result.get("per_class") or {
        name: {"AP": ap} for name, ap in result["per_class_AP"].items()
    }
    columns = [c for c in next(iter(rows.values())) if c != "AP"]
    titles = {c: c.replace("_calibrated", "*").replace("positives", "pos") for c in columns}
    width = max(len(name) for name in rows) + 2
    lines = [f"{'class':<{width}}{'AP':>8}" + "".join(f"{titles[c]:>8}" for c in columns)]
    for name, row in rows.items():
        cells = "".join(
            f"{row[c]:>8d}" if c == "positives" else f"{_number(row[c]):>8}" for c in columns
        )
        lines.append(f"{name:<{width}}{_number(row['AP']):>8}{cells}")
    if any(c.endswith("_calibrated") for c in columns):
        lines.append("(*: at the per-class thresholds)")
    return lines


def _number(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # NaN: a class without positives
