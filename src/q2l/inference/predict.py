"""Prediction entry point: score a folder, glob or list of images with a checkpoint or an export.

    python predict.py ckpt=outputs/.../checkpoints/best.pt input=photos/ output=predictions.jsonl
    q2l-predict model_file=best.onnx input='photos/**/*.jpg' output=predictions.csv  # or model=

The scoring is q2l.inference.classifier.Classifier's, the Python API (`q2l.load`), streamed here
into a file.

Writes one row per readable image: its path, the labels at or above their class's threshold and
every class's score (q2l.inference.writers). An unreadable image is logged, listed in the closing
summary and skipped; the job goes on. The output file must not exist (refused before any work).
Thresholds: calibrated per-class ones when there are (q2l.inference.model_info.choose_thresholds),
else the run's trainer.threshold; the log says which.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from q2l.inference.classifier import Classifier
from q2l.inference.inputs import resolve_inputs
from q2l.inference.runtime import load_scorer
from q2l.inference.writers import PredictionWriter, check_output
from q2l.utils.messages import and_more
from q2l.utils.progress import track

log = logging.getLogger("q2l.inference.predict")


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Score every image `cfg.input` names into `cfg.output`; returns a summary.

    Returns:
        {"output", "num_images", "num_scored", "skipped": [(path, reason)], "thresholds"}.
    """
    output = check_output(cfg.output)
    paths = resolve_inputs(cfg.input)
    scorer = load_scorer(cfg.ckpt, cfg.model_file, cfg.weights, cfg.device, cfg.precision)
    classifier = Classifier(scorer, cfg.thresholds, cfg.ckpt)
    log.info(
        "model %s (%s); %s",
        cfg.ckpt or cfg.model_file,
        classifier.description,
        classifier.thresholds_note,
    )
    log.info("%d images from %s -> %s", len(paths), cfg.input, output)

    batches = classifier.prediction_batches(
        paths, cfg.batch_size, cfg.num_workers, cfg.max_image_pixels
    )
    total = math.ceil(len(paths) / cfg.batch_size)
    writer = PredictionWriter(output, classifier.class_names)
    skipped: list[tuple[str, str]] = []
    for predictions in track(batches, total, "predict", cfg.progress_bar):
        for prediction in predictions:
            if prediction.error:  # logged by the classifier when met
                skipped.append((prediction.path, prediction.error))
            else:
                writer.write(prediction.path, list(prediction.scores.values()), prediction.labels)
    written = writer.close()
    _log_summary(len(paths), writer.rows, skipped, written)
    return {
        "output": str(written),
        "num_images": len(paths),
        "num_scored": writer.rows,
        "skipped": skipped,
        "thresholds": classifier.thresholds_note,
    }


def _log_summary(total: int, scored: int, skipped: list[tuple[str, str]], output: Path) -> None:
    log.info("scored %d of %d images -> %s", scored, total, output)
    if skipped:
        log.warning(
            "%d unreadable image(s) skipped: %s",
            len(skipped),
            and_more((path for path, _ in skipped), separator="; "),
        )
