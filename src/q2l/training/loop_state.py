"""Where the epoch loop stands, saved in every checkpoint, and the bests it tracks: `LoopState`,
`track_bests` and `early_stop` (trainer.early_stop_patience and trainer.early_stop_rule)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from q2l.training.records import EpochRecord


@dataclass
class LoopState:
    """Where the loop stands (the step count lives in TrainState); saved in every checkpoint (as
    its `progress` entry)."""

    epoch: int = 0  # completed training epochs
    validated_epoch: int = 0  # the last epoch whose validation finished (a stop may interrupt it)
    batches_done: int = 0  # batches of the current epoch this rank has trained on
    samples_done: int = 0  # samples of the current epoch's order consumed by all ranks together
    # The current epoch's totals so far, so that a resumed epoch's record covers the whole epoch.
    # This process's own: under DDP every process saves its totals into the checkpoint
    # (`rank_totals`) and gets its own back, so a resumed epoch's record is the uninterrupted one.
    epoch_loss_sum: float = 0.0
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    best_metric: float = float("-inf")  # the monitored score, the better of raw and EMA
    best_epoch: int = -1
    # The raw and EMA weights' own bests, for trainer.early_stop_rule=official.
    best_raw_metric: float = float("-inf")
    best_raw_epoch: int = -1
    best_ema_metric: float = float("-inf")
    consecutive_skips: int = 0  # fp16 loss-scaler skips in a row
    status: str = "running"  # then completed / early_stopped: a finished run is not trained again

    @classmethod
    def from_checkpoint(
        cls, checkpoint: dict[str, Any], rank: int = 0, world_size: int = 1
    ) -> LoopState:
        """The saved position, with this process's own epoch totals.

        Checkpoints hold every process's totals in `progress["rank_totals"]`; resumed on another
        number of processes, rank 0 carries the whole sum so far and the others start from 0.
        """
        saved = checkpoint["progress"]
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in known})
        totals = saved.get("rank_totals")
        if totals is not None:
            if len(totals) == world_size:
                mine = totals[rank]
            else:
                mine = [sum(column) for column in zip(*totals, strict=True)] if rank == 0 else None
            state.epoch_loss_sum, state.epoch_images, state.epoch_seconds = (
                mine if mine is not None else (0.0, 0, 0.0)
            )
        return state

    def totals(self) -> tuple[float, int, float]:
        """This process's epoch totals so far: (loss sum, images, seconds)."""
        return self.epoch_loss_sum, self.epoch_images, self.epoch_seconds

    def next_epoch(self) -> None:
        """The epoch's record is written: the next one counts from zero."""
        self.validated_epoch = self.epoch
        self.batches_done = self.samples_done = self.epoch_images = 0
        self.epoch_loss_sum = self.epoch_seconds = 0.0


def track_bests(record: EpochRecord, loop: LoopState) -> bool:
    """Fold the epoch's monitored scores into `loop`; True when the best improved."""
    improved = record.value > loop.best_metric  # NaN is never an improvement
    if improved:
        loop.best_metric, loop.best_epoch = record.value, loop.epoch
    raw = record.raw[record.monitor]
    if raw > loop.best_raw_metric:
        loop.best_raw_metric, loop.best_raw_epoch = raw, loop.epoch
    ema = record.ema[record.monitor] if record.ema else None
    if ema is not None and ema > loop.best_ema_metric:
        loop.best_ema_metric = ema
    return improved


def early_stop(record: EpochRecord, loop: LoopState, patience: int | None, rule: str) -> bool:
    """Whether trainer.early_stop_patience and trainer.early_stop_rule end training here.

    "best": the best monitored score is `patience` epochs old. "official" (main_mlc.py): more than
    `patience` epochs have passed since the later of the best epoch and the raw weights' best
    epoch, at least two epochs were validated, and the last EMA score (the raw one without EMA)
    is below the best EMA score.
    """
    if patience is None:
        return False
    if rule == "best":
        return loop.epoch - loop.best_epoch >= patience
    weights = record.ema if record.ema is not None else record.raw
    best = loop.best_ema_metric if record.ema is not None else loop.best_raw_metric
    last = weights[record.monitor]
    since = loop.epoch - max(loop.best_epoch, loop.best_raw_epoch)
    return loop.best_epoch >= 1 and since > patience and loop.epoch > 1 and last < best
