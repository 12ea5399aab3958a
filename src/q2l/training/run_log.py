"""What a run records: metrics.jsonl (one line per epoch) and metrics.json (the summary), always;
and the same to every logger the `logger` config group selected (q2l.training.loggers).

A logger that fails while the run trains (a tracking server gone, a full disk) is named in a
warning and dropped for the rest of the run: training goes on, and metrics.jsonl, metrics.json
and the checkpoints keep everything. One that fails to start stops the run before its first step.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from q2l.training.loggers import Hyperparameters, RunLogger, RunOutcome
from q2l.training.records import EpochRecord
from q2l.utils.atomic import atomic_write

log = logging.getLogger(__name__)


class RunLog:
    """Append-only metric records in `run_dir`, mirrored to the run's loggers.

    Args:
        run_dir: the run directory; the metric files go inside.
        history: epoch records from an earlier run being resumed; metrics.jsonl is rewritten
            with them first (whole, atomically) so the resumed run directory holds the whole
            history.
        loggers: the backends (q2l.training.loggers.build_loggers); each is started here with
            `hparams` and `history`.
        hparams: the run's hyperparameters (q2l.training.loggers.run_hyperparameters).
    """

    def __init__(
        self,
        run_dir: str | Path,
        history: list[EpochRecord] | None = None,
        loggers: Sequence[RunLogger] = (),
        hparams: Hyperparameters | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.history: list[EpochRecord] = list(history or [])
        self.jsonl = self.run_dir / "metrics.jsonl"
        with atomic_write(self.jsonl, "w") as handle:
            handle.writelines(_line(record) for record in self.history)
        self.loggers: list[RunLogger] = []
        self._outcome: RunOutcome | None = None
        hparams = hparams or Hyperparameters(choices={}, values={})
        for logger in loggers:
            try:
                logger.start(hparams, self.history)
            except BaseException:
                self.close()  # the loggers started so far end their runs as failed
                raise
            self.loggers.append(logger)

    def log_epoch(self, record: EpochRecord) -> None:
        """One epoch's numbers: a metrics.jsonl line, and the record to every logger."""
        self.history.append(record)
        with self.jsonl.open("a") as handle:
            handle.write(_line(record))
        self._each("log_epoch", record)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        """Per-step train loss and learning rate, to the loggers only."""
        self._each("log_step", step, loss, lr)

    def log_validation(
        self,
        step: int,
        scores: torch.Tensor,
        targets: torch.Tensor,
        class_names: list[str],
        threshold: float,
        dataset: Any = None,
    ) -> None:
        """An epoch's (N, K) scores and {-1, 0, 1} targets of the weights that scored best, for
        the loggers' per-class views (TensorBoard's per-class AP, PR curves and image grid)."""
        self._each("log_validation", step, scores, targets, class_names, threshold, dataset)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """metrics.json: final and best results, written atomically; the loggers record them
        when they end (`close`)."""
        write_json(self.run_dir / "metrics.json", summary)
        self._outcome = RunOutcome.from_summary(summary)

    def close(self) -> None:
        """End every logger's run: with the summary, or as failed when there was none."""
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            try:
                logger.finish(self._outcome)
            except Exception as error:
                log.warning(
                    "logger %s failed to finish: %s: %s", logger.name, type(error).__name__, error
                )

    def _each(self, method: str, *arguments: Any) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*arguments)
            except Exception as error:
                self.loggers.remove(logger)
                log.warning(
                    "logger %s failed (%s: %s) and logs nothing more in this run; training goes "
                    "on, and metrics.jsonl and the checkpoints keep every number",
                    logger.name,
                    type(error).__name__,
                    error,
                )
                try:
                    logger.finish(None)
                except Exception:
                    pass  # it is broken already; its failure is reported above


def _line(record: EpochRecord) -> str:
    return json.dumps(_finite(record.to_json())) + "\n"


class NullRunLog:
    """What ranks other than 0 get: the RunLog interface, writing nothing."""

    def __init__(self) -> None:
        self.history: list[EpochRecord] = []

    def log_epoch(self, record: EpochRecord) -> None:
        pass

    def log_step(self, step: int, loss: float, lr: float) -> None:
        pass

    def log_validation(self, step: int, *arguments: Any, **options: Any) -> None:
        pass

    def write_summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: write null for non-finite floats."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (q2l.utils.atomic), so a reader never sees half a file."""
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
