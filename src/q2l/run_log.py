"""What a run records: metrics.jsonl (one line per epoch), metrics.json and TensorBoard: scalars,
per-class AP and precision-recall curves, a labelled grid of val images, and the hparams view."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from q2l.atomic import atomic_write
from q2l.metrics import upgrade_metric_names

log = logging.getLogger(__name__)

# TensorBoard gets per-class AP and PR curves for at most this many classes (the first ones): a
# few hundred curves per epoch already make the PR tab unusable and the event file large.
MAX_CLASSES_IN_TENSORBOARD = 100
IMAGES_IN_GRID = 8  # the first val images, the same every epoch, so their captions can be compared
# Config entries shown in TensorBoard's HParams view besides the command's own overrides.
KEY_HPARAMS = (
    "backbone.name",
    "model.hidden_dim",
    "dataset.image_size",
    "dataset.batch_size",
    "optimizer.lr",
    "optimizer.weight_decay",
    "loss._target_",
    "trainer.epochs",
    "trainer.precision",
    "seed",
)


class RunLog:
    """Append-only metric records in `run_dir`, mirrored to TensorBoard.

    Args:
        run_dir: the run directory; tensorboard/ and the metric files go inside.
        history: epoch records from an earlier run being resumed; rewritten first so the
            resumed run directory holds the whole history.
    """

    def __init__(self, run_dir: str | Path, history: list[dict[str, Any]] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.history: list[dict[str, Any]] = []
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.jsonl.write_text("")
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        for record in history or []:
            self._append(upgrade_metric_names(record))  # records of older q2l, today's names

    def log_epoch(self, record: dict[str, Any], step: int) -> None:
        """One epoch's numbers: a metrics.jsonl line and a TensorBoard scalar each."""
        self._append(record)
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                self.writer.add_scalar(_tag(key), value, global_step=step)
        self.writer.flush()

    def log_step(self, step: int, **scalars: float) -> None:
        """Per-step scalars (train loss, lr) to TensorBoard only, under train/step/*."""
        for key, value in scalars.items():
            self.writer.add_scalar(f"train/step/{key}", value, global_step=step)

    def log_validation(
        self,
        step: int,
        scores: torch.Tensor,
        targets: torch.Tensor,
        class_names: list[str],
        threshold: float,
        dataset: Any = None,
    ) -> None:
        """An epoch's per-class view in TensorBoard: AP of each class (val_class_AP/<name>), its
        precision-recall curve (val_pr/<name>), and the first val images with predicted and true
        labels (val/predictions), when `dataset` has `image_paths` in loader order.

        scores, targets: (N, K) probabilities and {-1, 0, 1} targets of the weights that scored
        best this epoch.
        """
        from q2l.metrics import average_precision

        shown = min(len(class_names), MAX_CLASSES_IN_TENSORBOARD)
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
        grid = _prediction_grid(scores, targets, class_names, threshold, dataset)
        if grid is not None:
            self.writer.add_image("val/predictions", grid, step, dataformats="HWC")
        self.writer.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        """metrics.json: final and best results, written atomically; and TensorBoard's hparams
        view (the run's key settings and overrides against its best mAP), so a sweep's jobs can
        be compared there."""
        write_json(self.run_dir / "metrics.json", summary)
        best = summary.get("best", {}).get("mAP")
        if best is not None and math.isfinite(best):
            self._write_hparams(best)

    def _write_hparams(self, best_map: float) -> None:
        """The hparams summaries into the run's own TensorBoard folder (a new event file: the
        writer may be closed by now), so the HParams tab links them to the run's curves."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        values = run_hparams(self.run_dir)
        if not values:
            return
        metrics = {"hparams/best_mAP": best_map}
        with SummaryWriter(log_dir=str(self.run_dir / "tensorboard")) as writer:
            for summary in hparams(values, metrics):
                writer.file_writer.add_summary(summary)
            for key, value in metrics.items():
                writer.add_scalar(key, value)

    def close(self) -> None:
        self.writer.close()

    def _append(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        with self.jsonl.open("a") as handle:
            handle.write(json.dumps(_finite(record)) + "\n")


class NullRunLog:
    """What ranks other than 0 get: the RunLog interface, writing nothing."""

    history: list[dict[str, Any]] = []

    def log_epoch(self, record: dict[str, Any], step: int) -> None:
        pass

    def log_step(self, step: int, **scalars: float) -> None:
        pass

    def log_validation(self, step: int, *arguments: Any, **options: Any) -> None:
        pass

    def write_summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _tag(key: str) -> str:
    """Group TensorBoard scalars: train/*, val/*, val_ema/*."""
    if key.startswith("train_"):
        return f"train/{key.removeprefix('train_')}"
    if key.endswith("_ema"):
        return f"val_ema/{key.removesuffix('_ema')}"
    return f"val/{key}"


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: write null for non-finite floats."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (q2l.atomic), so a reader never sees half a file."""
    with atomic_write(path, "w") as handle:
        json.dump(_finite_nested(data), handle, indent=2)


def _finite_nested(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_nested(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_hparams(run_dir: Path) -> dict[str, Any]:
    """The run's KEY_HPARAMS (from config.yaml) and its command-line overrides (from
    .hydra/overrides.yaml, which sweeps vary), as TensorBoard-ready scalars and strings."""
    from omegaconf import OmegaConf

    values: dict[str, Any] = {}
    config_file, overrides_file = run_dir / "config.yaml", run_dir / ".hydra" / "overrides.yaml"
    try:
        if config_file.is_file():
            config = OmegaConf.load(config_file)
            for key in KEY_HPARAMS:
                value = OmegaConf.select(config, key, default=None)
                if value is not None:
                    values[key] = value
        if overrides_file.is_file():
            for override in OmegaConf.to_container(OmegaConf.load(overrides_file)):
                key, _, value = str(override).lstrip("+~").partition("=")
                if not key.startswith("hydra."):
                    values[key] = value
    except (OSError, ValueError) as error:  # a damaged file must not fail a finished run
        log.warning("hparams for TensorBoard left out: %s", error)
        return {}
    return {key: _hparam(value) for key, value in values.items()}


def _hparam(value: Any) -> int | float | str | bool:
    """A value TensorBoard's hparams accept: numbers and booleans as such, anything else text."""
    if isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _prediction_grid(
    scores: torch.Tensor,
    targets: torch.Tensor,
    class_names: list[str],
    threshold: float,
    dataset: Any,
) -> np.ndarray | None:
    """(H, W, 3) uint8 grid of the first IMAGES_IN_GRID val images, captioned with predicted
    (green right, red wrong) and missed labels; None without readable image files."""
    from q2l.data.dataset import BadImageError, load_rgb
    from q2l.drawing import labelled_images

    paths = getattr(dataset, "image_paths", None)
    count = min(IMAGES_IN_GRID, len(scores), len(paths or []))
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
