"""Prediction entry point: score a folder, glob or list of images with a checkpoint or an export.

    python predict.py ckpt=outputs/.../checkpoints/best.pt input=photos/ output=predictions.jsonl
    q2l-predict model_file=best.onnx input='photos/**/*.jpg' output=predictions.csv  # or model=

Writes one row per readable image: its path, the labels at or above their class's threshold and
every class's score (q2l.inference.writers). An unreadable image is logged, listed in the closing
summary and skipped; the job goes on. The output file must not exist (refused before any work).
Thresholds: calibrated per-class ones when there are (q2l.inference.model_info.choose_thresholds),
else the run's trainer.threshold; the log says which.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from q2l.data.transforms import build_eval_transform
from q2l.inference.inputs import ImageFiles, collate, resolve_inputs
from q2l.inference.model_info import choose_thresholds
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
    info, thresholds_note = choose_thresholds(scorer.info, cfg.thresholds, cfg.ckpt)
    log.info("model %s (%s); %s", cfg.ckpt or cfg.model_file, scorer.description, thresholds_note)
    log.info("%d images from %s -> %s", len(paths), cfg.input, output)

    transform = build_eval_transform(info.image_size, info.mean, info.std)
    loader = DataLoader(
        ImageFiles(paths, transform, info.image_size, max_pixels=cfg.max_image_pixels),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=collate,
    )
    thresholds = torch.tensor(info.class_thresholds(), dtype=torch.float64)
    writer = PredictionWriter(output, info.class_names)
    skipped: list[tuple[str, str]] = []
    for images, indices, errors in track(loader, len(loader), "predict", cfg.progress_bar):
        readable = [row for row, error in enumerate(errors) if not error]
        for row in (row for row, error in enumerate(errors) if error):
            log.warning("skipping unreadable image: %s", errors[row])
            skipped.append((str(paths[indices[row]]), errors[row]))
        if not readable:
            continue
        scores = scorer(images[readable])  # (B', K)
        predicted = scores.double() >= thresholds  # (B', K)
        for row, image_scores, image_predicted in zip(readable, scores, predicted, strict=True):
            labels = [
                n for n, p in zip(info.class_names, image_predicted.tolist(), strict=True) if p
            ]
            writer.write(str(paths[indices[row]]), image_scores.tolist(), labels)
    written = writer.close()
    _log_summary(len(paths), writer.rows, skipped, written)
    return {
        "output": str(written),
        "num_images": len(paths),
        "num_scored": writer.rows,
        "skipped": skipped,
        "thresholds": thresholds_note,
    }


def _log_summary(total: int, scored: int, skipped: list[tuple[str, str]], output: Path) -> None:
    log.info("scored %d of %d images -> %s", scored, total, output)
    if skipped:
        log.warning(
            "%d unreadable image(s) skipped: %s",
            len(skipped),
            and_more((path for path, _ in skipped), separator="; "),
        )
