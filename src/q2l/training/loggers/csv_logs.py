"""logger=csv: plain CSV files in `<run dir>/csv/`, for spreadsheets and pandas.

    epochs.csv        one row per validated epoch: epoch, step, eval_weights, then the scalars
                      under the shared names (train/loss, val_raw/mAP, val_ema/mAP, val_best/mAP)
    steps.csv         step, train/step/loss, train/step/lr (every trainer.log_every_n_steps)
    hparams.csv       key, value: the run's hyperparameters (loss=asl, optimizer.lr, ...)
    summary.csv       key, value: status, the best and final epochs and their scores

epochs.csv, hparams.csv and summary.csv are rewritten whole (atomically) each time, so a resumed
run's epochs.csv holds exactly its history; steps.csv is appended to, so the steps between a
resumed checkpoint and the stop that interrupted the run appear twice, the later rows the
resumed run's.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from q2l.training.loggers.base import STEP_LOSS, STEP_LR, RunLogger, RunOutcome, epoch_scalars
from q2l.training.loggers.hyperparameters import Hyperparameters
from q2l.training.records import EpochRecord
from q2l.utils.atomic import atomic_write

FOLDER = "csv"
STEP_COLUMNS = ("step", STEP_LOSS, STEP_LR)


class CSVLogger(RunLogger):
    """CSV files in the run directory.

    Args:
        run_dir: the run directory; the files go into its csv/ folder.
    """

    name = "csv"

    def __init__(self, run_dir: str | Path) -> None:
        self.folder = Path(run_dir) / FOLDER
        self.epochs: list[dict[str, Any]] = []

    def start(self, hparams: Hyperparameters, history: Sequence[EpochRecord]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_pairs(self.folder / "hparams.csv", hparams.flat().items())
        self.epochs = [_row(record) for record in history]
        self._write_epochs()

    def log_step(self, step: int, loss: float, lr: float) -> None:
        path = self.folder / "steps.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            if new:
                writer.writerow(STEP_COLUMNS)
            writer.writerow([step, loss, lr])

    def log_epoch(self, record: EpochRecord) -> None:
        self.epochs.append(_row(record))
        self._write_epochs()

    def finish(self, outcome: RunOutcome | None) -> None:
        if outcome is None:
            return  # metrics.json records the failure and its reason
        pairs = {"status": outcome.status, "monitor": outcome.monitor, "weights": outcome.weights}
        _write_pairs(self.folder / "summary.csv", [*pairs.items(), *outcome.scalars.items()])

    def _write_epochs(self) -> None:
        # Every column any epoch has, in first-seen order (a resumed run may add the EMA's).
        columns = list(dict.fromkeys(key for row in self.epochs for key in row))
        with atomic_write(self.folder / "epochs.csv", "w") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.epochs)


def _row(record: EpochRecord) -> dict[str, Any]:
    return {
        "epoch": record.epoch,
        "step": record.step,
        "eval_weights": record.weights,
        **epoch_scalars(record),
    }


def _write_pairs(path: Path, pairs) -> None:
    with atomic_write(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["key", "value"])
        writer.writerows(pairs)
