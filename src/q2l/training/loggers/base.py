"""What every logger receives, and the names it records things under.

A run hands each of its loggers (config group `logger`, one class per backend in this folder)
the same things, in this order: `start` (the run's hyperparameters, once, and the epochs a
resumed run already has), `log_step` (train loss and lr every trainer.log_every_n_steps),
`log_epoch` (each validated epoch's `EpochRecord`), `log_validation` (the epoch's scores, for
backends that draw per-class views) and `finish` (the run's outcome; None when it failed).

One vocabulary for every backend (`epoch_scalars`, `STEP_LOSS`, `STEP_LR`):

    train/step/loss, train/step/lr      per step
    train/loss, train/lr, train/images_per_sec, train/bad_images     per epoch
    val_raw/<metric>                    the raw weights' metrics (mAP, mAP_voc, CP, ..., OF1_top3)
    val_ema/<metric>                    the weight EMA's metrics (runs that keep an EMA)
    val_best/mAP, val_best/mAP_voc      the better of raw and EMA (what best.pt keeps)
    best/<...>, final/<...>             the summary: best and final epoch, their scores
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from q2l.training.loggers.hyperparameters import Hyperparameters
from q2l.training.records import BEST_OF, EpochRecord

STEP_LOSS = "train/step/loss"
STEP_LR = "train/step/lr"


class RunLogger(ABC):
    """One logging backend of a run; only rank 0 has loggers.

    Built (by Hydra, from conf/logger/<name>.yaml) with the run directory and the backend's own
    options; building opens nothing: the backend's run starts in `start`, so a run that fails
    before its first step leaves nothing behind in a tracking server.
    """

    name: ClassVar[str]  # the option's name (logger=<name>) and its key in logger_runs.json
    # The module the backend imports and the q2l extra that installs it (checked before a run
    # reads any data: q2l.training.loggers.check_packages); None for what q2l always installs.
    package: ClassVar[str | None] = None
    extra: ClassVar[str | None] = None

    @abstractmethod
    def start(self, hparams: Hyperparameters, history: Sequence[EpochRecord]) -> None:
        """Open (or continue) the backend's run and record the hyperparameters.

        history: the epochs a resumed run already has (empty for a new run); a backend that could
        not continue its own earlier run records them into its new one.
        """

    @abstractmethod
    def log_step(self, step: int, loss: float, lr: float) -> None:
        """The train loss of optimizer step `step` and the learning rate after it."""

    @abstractmethod
    def log_epoch(self, record: EpochRecord) -> None:
        """One validated epoch (at its last optimizer step, `record.step`)."""

    def log_validation(  # noqa: B027 (optional: only backends with per-class views override it)
        self,
        step: int,
        scores: torch.Tensor,
        targets: torch.Tensor,
        class_names: list[str],
        threshold: float,
        dataset: Any = None,
    ) -> None:
        """The epoch's (N, K) scores and {-1, 0, 1} targets of the better weights: backends that
        draw per-class views (TensorBoard) override this; the others record scalars only."""

    @abstractmethod
    def finish(self, outcome: RunOutcome | None) -> None:
        """Record the outcome and end the backend's run; `outcome` None: the run failed."""


def epoch_scalars(record: EpochRecord) -> dict[str, float]:
    """The epoch's numbers under their logged names (the module docstring lists them)."""
    scalars = {f"train/{key.removeprefix('train_')}": value for key, value in record.train.items()}
    scalars.update({f"val_raw/{key}": value for key, value in record.raw.items()})
    if record.ema is not None:
        scalars.update({f"val_ema/{key}": value for key, value in record.ema.items()})
    scalars.update(
        {f"val_best/{metric}": record.best(metric) for metric in BEST_OF if metric in record.raw}
    )
    return {key: float(value) for key, value in scalars.items() if _number(value)}


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended, read from its summary (metrics.json, q2l.training.records.run_summary).

    status: completed, early_stopped or preempted (a preempted run continues with resume=auto).
    weights: "raw" or "ema", the better weights at the best epoch (None without an epoch).
    scalars: best/epoch, best/<monitor>, best/mAP, best/mAP_voc, final/epoch, final/mAP,
        final/mAP_voc, epochs_run, steps, wall_time_s (non-finite ones left out).
    """

    status: str
    monitor: str
    weights: str | None
    scalars: dict[str, float]

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> RunOutcome:
        best, final = summary.get("best") or {}, summary.get("final") or {}
        monitor = summary.get("monitor", "mAP")
        candidates = {
            "best/epoch": best.get("epoch"),
            f"best/{monitor}": best.get("value"),
            "best/mAP": best.get("mAP"),
            "best/mAP_voc": best.get("mAP_voc"),
            "final/epoch": final.get("epoch"),
            "final/mAP": final.get("mAP"),
            "final/mAP_voc": final.get("mAP_voc"),
            "epochs_run": summary.get("epochs_run"),
            "steps": summary.get("steps"),
            "wall_time_s": summary.get("wall_time_s"),
        }
        return cls(
            status=summary.get("status", "completed"),
            monitor=monitor,
            weights=best.get("weights"),
            scalars={key: value for key, value in candidates.items() if _number(value)},
        )

    @property
    def succeeded(self) -> bool:
        """Training ended as planned (all epochs, or early stopping)."""
        return self.status in ("completed", "early_stopped")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
