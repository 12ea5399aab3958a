"""logger=tensorboard (the default): `<run dir>/tensorboard/`, read by `make tensorboard`.

Scalars under the shared names (q2l.training.loggers.base), each class's AP (val_class_AP/<class>)
and precision-recall curve (val_pr/<class>), the first val images captioned with predicted and
true labels (val/predictions), and at the end the HParams view: the run's hyperparameters against
its best mAP (hparams/best_mAP), so a sweep's jobs can be compared there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from q2l.training.loggers.base import STEP_LOSS, STEP_LR, RunLogger, RunOutcome, epoch_scalars
from q2l.training.loggers.hyperparameters import Hyperparameters
from q2l.training.records import EpochRecord

FOLDER = "tensorboard"


class TensorBoardLogger(RunLogger):
    """TensorBoard event files in the run directory.

    Args:
        run_dir: the run directory; the event files go into its tensorboard/ folder.
        max_classes: per-class AP and PR curves for at most this many classes (the first ones),
            since a few hundred curves per epoch make the PR tab unusable and the file large.
        images: how many val images (the first ones, the same every epoch) the captioned grid shows.
    """

    name = "tensorboard"

    def __init__(self, run_dir: str | Path, max_classes: int = 100, images: int = 8) -> None:
        self.folder = Path(run_dir) / FOLDER
        self.max_classes = max_classes
        self.images = images
        self.hparams: Hyperparameters | None = None
        self.writer = None

    def start(self, hparams: Hyperparameters, history: Sequence[EpochRecord]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A run that starts logging to TensorBoard on resume gets the epochs it already has.
        replay = not any(self.folder.glob("events.out.tfevents.*"))
        self.hparams = hparams
        self.writer = SummaryWriter(log_dir=str(self.folder))
        if replay:
            for record in history:
                self.log_epoch(record)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar(STEP_LOSS, loss, global_step=step)
        self.writer.add_scalar(STEP_LR, lr, global_step=step)

    def log_epoch(self, record: EpochRecord) -> None:
        for key, value in epoch_scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record.step)
        self.writer.flush()

    def log_validation(
        self,
        step: int,
        scores: torch.Tensor,
        targets: torch.Tensor,
        class_names: list[str],
        threshold: float,
        dataset: Any = None,
    ) -> None:
        """Each class's AP and PR curve, and the captioned grid of the first val images (when
        `dataset` has `image_paths` in loader order)."""
        from q2l.metrics import average_precision

        shown = min(len(class_names), self.max_classes)
        per_class = average_precision(scores, targets)
        for k in range(shown):
            annotated = targets[:, k] != -1
            if math.isfinite(per_class[k]):
                self.writer.add_scalar(f"val_class_AP/{class_names[k]}", 100 * per_class[k], step)
            if bool((targets[annotated, k] == 1).any()):
                self.writer.add_pr_curve(
                    f"val_pr/{class_names[k]}",
                    (targets[annotated, k] == 1).numpy(),
                    scores[annotated, k].float().numpy(),
                    global_step=step,
                )
        grid = _prediction_grid(scores, targets, class_names, threshold, dataset, self.images)
        if grid is not None:
            self.writer.add_image("val/predictions", grid, step, dataformats="HWC")
        self.writer.flush()

    def finish(self, outcome: RunOutcome | None) -> None:
        """The HParams view (hyperparameters against the best mAP), then close the files."""
        best = outcome.scalars.get("best/mAP") if outcome is not None else None
        if best is not None and self.hparams is not None and self.hparams.flat():
            from torch.utils.tensorboard.summary import hparams

            metrics = {"hparams/best_mAP": best}
            for summary in hparams(self.hparams.flat(), metrics):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_scalar("hparams/best_mAP", best)
        self.writer.close()


def _prediction_grid(
    scores: torch.Tensor,
    targets: torch.Tensor,
    class_names: list[str],
    threshold: float,
    dataset: Any,
    count: int,
) -> np.ndarray | None:
    """(H, W, 3) uint8 grid of the first `count` val images, captioned with predicted (green
    right, red wrong) and missed labels; None without readable image files."""
    from q2l.data.dataset import BadImageError, load_rgb
    from q2l.utils.drawing import labelled_images

    paths = getattr(dataset, "image_paths", None)
    count = min(count, len(scores), len(paths or []))
    if count == 0:
        return None
    images, predicted, truth = [], [], []
    for index in range(count):
        try:
            images.append(load_rgb(paths[index]))
        except BadImageError:
            continue
        predicted.append(
            [n for n, s in zip(class_names, scores[index].tolist(), strict=True) if s >= threshold]
        )
        truth.append(
            [n for n, t in zip(class_names, targets[index].tolist(), strict=True) if t == 1]
        )
    if not images:
        return None
    return np.asarray(labelled_images(images, predicted, truth))
