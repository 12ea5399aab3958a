"""The epochs of one run around the engine's steps: validation, records, checkpoints, early
stopping and stop requests.

Each epoch is trained, then validated with the raw weights and their EMA; a stop request (signal)
during either is honoured at the next step or batch with a checkpoint, and a run resumed from it
continues bitwise identically on CPU, an interrupted validation included (docs/reliability.md
lists the test behind each promise).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from q2l.metrics import compute_metrics
from q2l.training.checkpoint import (
    keep_top,
    non_finite_parts,
    purge_periodic,
    save_checkpoint,
    top_checkpoint_name,
    training_payload,
    weights_payload,
)
from q2l.training.engine import NonFiniteError, StepOptions, TrainState, evaluate, train_one_epoch
from q2l.training.loop_state import LoopState, early_stop, track_bests
from q2l.training.preemption import StopRequest
from q2l.training.records import EpochRecord
from q2l.training.resume import capture_rng
from q2l.training.run_log import RunLog
from q2l.utils import dist
from q2l.utils.progress import track

log = logging.getLogger("q2l.train")


@dataclass(frozen=True)
class TrainerSettings:
    """What the loop itself reads of `trainer.*` (q2l.config.TrainerConf documents each)."""

    epochs: int
    monitor: str = "mAP"
    threshold: float = 0.5
    early_stop_patience: int | None = None
    early_stop_rule: str = "best"
    log_every_n_steps: int = 50
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    overfit_batches: int | None = None
    progress_bar: bool = True
    checkpoint_every_steps: int | None = None
    keep_last: int = 2
    save_top_k: int = 1
    max_consecutive_skipped_steps: int = 25

    @classmethod
    def from_config(cls, trainer: Mapping[str, Any]) -> TrainerSettings:
        """The settings from a resolved `trainer` config node (other keys left out)."""
        return cls(**{f.name: trainer[f.name] for f in fields(cls) if f.name in trainer})


@dataclass
class RunOutputs:
    """Where and what the loop writes: the run directory, the run's resolved config and class
    names (both go into every checkpoint), and the metric log."""

    run_dir: Path
    config: dict[str, Any]
    class_names: list[str]
    run_log: RunLog


class Trainer:
    """Trains and validates one run up to `settings.epochs`, an early stop or a stop request.

    Every decision is taken by all ranks together: a stop request on any rank stops all of them
    at the same step, and every rank gets the validation record rank 0 computed.
    """

    def __init__(
        self,
        state: TrainState,
        train_loader: Any,
        val_loader: Any,
        settings: TrainerSettings,
        loop: LoopState,
        outputs: RunOutputs,
        options: StepOptions,
        eval_options: StepOptions,
        stop: StopRequest,
    ) -> None:
        self.state, self.loop, self.settings, self.outputs = state, loop, settings, outputs
        self.train_loader, self.val_loader = train_loader, val_loader
        self.options, self.eval_options = options, eval_options  # training / validation steps
        self.stop = stop  # polled at every step; its handlers only set a flag inside fit()
        self.checkpoints = outputs.run_dir / "checkpoints"

    def fit(self) -> str:
        """Run the remaining epochs; returns the status (completed, early_stopped, preempted)."""
        try:
            with self.stop.deferred():
                return self._epochs()
        except NonFiniteError as error:
            # Every checkpoint is checked finite before it is written, so last.pt is a good one.
            last = self.checkpoints / "last.pt"
            kept = f"last good checkpoint: {last}" if last.exists() else "no checkpoint saved yet"
            raise NonFiniteError(f"{error}; nothing was saved from this step; {kept}") from None

    def _epochs(self) -> str:
        """Validate what was trained, then train the next epoch, until the end."""
        loop = self.loop
        while True:
            if loop.validated_epoch < loop.epoch:
                record = self._validate()
                if record is None or dist.any_rank(bool(self.stop)):
                    return self._preempted()
                status = self._finish_epoch(record)
                if status is not None:
                    return status
            if loop.epoch >= self.settings.epochs:
                loop.status = "completed"
                return loop.status
            if self._train_epoch():
                return self._preempted()
            loop.epoch += 1  # batches_done keeps the epoch's count until its record is written

    # Training

    def _train_epoch(self) -> bool:
        """Train from where the epoch stands to its end; True when a stop request ended it.

        The epoch's loss, image and time totals accumulate in the loop state, so that they
        survive a checkpoint and the epoch's record covers all of it, resumed or not.
        """
        loop, loader = self.loop, self.train_loader
        # overfit_batches: every epoch takes its batches from the first epoch's order.
        overfit = self.settings.overfit_batches
        loader.sampler.set_epoch(0 if overfit else loop.epoch, start=loop.samples_done)
        self._part = _EpochPart(loop, loader.batch_size)
        remaining = len(loader)  # the sampler starts after the samples already consumed
        limit = overfit or self.settings.limit_train_batches
        if limit is not None:
            remaining = min(remaining, max(limit - loop.batches_done, 0))
        where = f"epoch {loop.epoch + 1}/{self.settings.epochs} train"
        self._bar = self._progress_bar(itertools.islice(loader, remaining), remaining, where)
        self._stopped = False
        train_one_epoch(self.state, self._bar, self.options, self._after_step)
        self._part.write_into(loop)
        return self._stopped

    def _after_step(self, loss: torch.Tensor, skipped: bool, batches: int) -> bool:
        """After every optimizer step: totals, skipped-step guard, logging, stop, periodic save.
        Returns True to end the epoch (a stop request)."""
        state, loop, settings = self.state, self.loop, self.settings
        self._part.add(loss, batches, loop)
        loop.consecutive_skips = loop.consecutive_skips + 1 if skipped else 0
        if loop.consecutive_skips > settings.max_consecutive_skipped_steps:
            raise NonFiniteError(
                f"the fp16 loss scaler skipped {loop.consecutive_skips} steps in a row (scale "
                f"{state.scaler.get_scale():.3g}) up to step {state.step}: the loss is probably "
                "exploding; lower the learning rate, clip gradients (trainer.grad_clip_norm) or "
                "use bf16"
            )
        if state.step % settings.log_every_n_steps == 0:
            lr = state.optimizer.param_groups[0]["lr"]
            value = float(loss)  # one host copy for the log
            self.outputs.run_log.log_step(state.step, loss=value, lr=lr)
            # The bar shows the epoch's running mean, which the epoch's record will end with.
            self._bar.set_postfix(mean_loss=self._part.mean_loss(loop), lr=lr)
        self._stopped = dist.any_rank(bool(self.stop))
        every = settings.checkpoint_every_steps
        periodic = bool(every) and state.step % every == 0
        if self._stopped or periodic:
            self._part.write_into(loop)
        if periodic and not self._stopped:
            self._save(periodic=True)
        return self._stopped

    # Validation and the epoch's record

    def _validate(self) -> EpochRecord | None:
        """The epoch's record: the metrics of the raw weights and, with an EMA, of its weights.

        Each rank scores its own unpadded shard of the val split; rank 0 computes the metrics
        over all of them (every image exactly once) and hands the record to every rank. None
        when a stop request arrived during validation (on one process it stops at the next
        batch; under DDP the shards differ by a batch at most, so the ranks stop after the pass).
        """
        state, settings = self.state, self.settings
        should_stop = None if dist.is_distributed() else (lambda: bool(self.stop))
        candidates = {"raw": state.model}
        if state.ema is not None:
            candidates["ema"] = state.ema.module
        total = len(self.val_loader)
        if settings.limit_val_batches is not None:
            total = min(settings.limit_val_batches, total)
        metrics, outputs = {}, {}
        for weights, module in candidates.items():
            dist.broadcast_module_buffers(module)  # every replica is the model rank 0 saves
            where = f"epoch {self.loop.epoch}/{settings.epochs} val ({weights} weights)"
            batches = self._progress_bar(itertools.islice(self.val_loader, total), total, where)
            result = evaluate(module, batches, self.eval_options, should_stop=should_stop)
            if result is None:
                return None
            scores, targets = (_in_split_order(dist.gather_rows(rows)) for rows in result)
            if dist.is_main_process():
                metrics[weights] = compute_metrics(scores, targets, threshold=settings.threshold)
                outputs[weights] = scores, targets
        record = None
        if dist.is_main_process():
            record = EpochRecord(
                epoch=self.loop.epoch,
                step=state.step,
                monitor=settings.monitor,
                raw=metrics["raw"],
                ema=metrics.get("ema"),
            )
            scores, targets = outputs[record.weights]
            self.outputs.run_log.log_validation(
                state.step,
                scores,
                targets,
                self.outputs.class_names,
                settings.threshold,
                self.val_loader.dataset,
            )
        return dist.broadcast(record)

    def _finish_epoch(self, record: EpochRecord) -> str | None:
        """Record, log and checkpoint a validated epoch; returns the final status when training
        ends here."""
        loop, settings = self.loop, self.settings
        steps = max(loop.batches_done, 1) * dist.world_size()
        bad_images = getattr(self.train_loader.dataset, "bad_images", 0)
        record = dataclasses.replace(
            record,
            train={
                "train_loss": dist.sum_over_ranks(loop.epoch_loss_sum) / steps,
                "train_lr": self.state.optimizer.param_groups[0]["lr"],
                "train_images_per_sec": dist.sum_over_ranks(loop.epoch_images)
                / max(loop.epoch_seconds, 1e-9),
                "train_bad_images": int(dist.sum_over_ranks(bad_images)),
            },
        )
        loop.next_epoch()
        improved = track_bests(record, loop)
        self.outputs.run_log.log_epoch(record)
        log.info(
            "epoch %d/%d | train loss %.4f, %.0f img/s | %s | best: %s weights",
            loop.epoch,
            settings.epochs,
            record.train["train_loss"],
            record.train["train_images_per_sec"],
            " | ".join(_raw_and_ema(record, metric) for metric in ("mAP", "mAP_voc")),
            record.weights,
        )
        if early_stop(record, loop, settings.early_stop_patience, settings.early_stop_rule):
            log.info(
                "early stop (%s rule): no better %s for %d epochs",
                settings.early_stop_rule,
                record.monitor,
                settings.early_stop_patience,
            )
            loop.status = "early_stopped"
        elif loop.epoch >= settings.epochs:
            loop.status = "completed"
        self._save(record=record, improved=improved)
        return None if loop.status == "running" else loop.status

    # Checkpoints

    def _preempted(self) -> str:
        log.warning(
            "%s received: saving at step %d and stopping",
            self.stop.requested or "stop",
            self.state.step,
        )
        self._save()
        return "preempted"

    def _save(
        self, record: EpochRecord | None = None, improved: bool = False, periodic: bool = False
    ) -> None:
        """Write checkpoints/last.pt (and step-N.pt if periodic); point best.pt at it on
        improvement.

        Called on every rank: each rank's random streams and epoch totals go into rank 0's
        checkpoint. Weights or optimizer state that stopped being finite are never saved: every
        rank raises NonFiniteError, and the checkpoints already written (all finite) stay.
        """
        state, loop, outputs = self.state, self.loop, self.outputs
        broken = non_finite_parts(state)
        if dist.any_rank(bool(broken)):
            raise NonFiniteError(
                f"after step {state.step} the {' and '.join(broken) or 'state on another process'}"
                " hold non-finite values (the update diverged: lower the learning rate or clip "
                "gradients, trainer.grad_clip_norm)"
            )
        rank_state = dist.gather_objects((capture_rng(), loop.totals()))
        if not dist.is_main_process():
            return
        history = outputs.run_log.history
        latest = record or (history[-1] if history else None)
        payload = training_payload(
            state,
            [rng for rng, _ in rank_state],
            progress={**asdict(loop), "rank_totals": [totals for _, totals in rank_state]},
            epoch=loop.epoch,
            best_metric=loop.best_metric,
            best_epoch=loop.best_epoch,
            eval_weights=latest.weights if latest else "raw",
            metrics=latest.to_json() if latest else {},
            history=[r.to_json() for r in history],
            class_names=[str(name) for name in outputs.class_names],
            config=outputs.config,
            precision=self.options.precision,
            world_size=dist.world_size(),
        )
        if periodic:
            save_checkpoint(payload, self.checkpoints / f"step-{state.step:08d}.pt")
            purge_periodic(self.checkpoints, self.settings.keep_last)
        # best.pt before last.pt: a crash between them leaves a last.pt that has not yet seen
        # this epoch, so the resumed run scores the epoch again and writes best.pt again.
        if improved:
            save_checkpoint(weights_payload(payload), self.checkpoints / "best.pt")
        if record is not None and self.settings.save_top_k > 1 and math.isfinite(record.value):
            name = top_checkpoint_name(record.value, record.epoch)
            save_checkpoint(weights_payload(payload), self.checkpoints / name)
            keep_top(self.checkpoints, self.settings.save_top_k)
        save_checkpoint(payload, self.checkpoints / "last.pt")

    def _progress_bar(self, batches, total: int, description: str):
        enabled = self.settings.progress_bar and dist.is_main_process()
        return track(batches, total, description, enabled=enabled)


class _EpochPart:
    """Running totals of the part of an epoch trained in one go (from its start or a resume).

    The loss sum stays on the loss's device (no host sync per step), in float64 and continuing
    from the saved sum: a resumed epoch adds the same numbers in the same order as an
    uninterrupted one, so its loss is bitwise the same.
    """

    def __init__(self, loop: LoopState, batch_size: int) -> None:
        self.batch_size = batch_size
        self.loss_sum = torch.tensor(loop.epoch_loss_sum, dtype=torch.float64)
        self.batches_at_start, self.samples_at_start = loop.batches_done, loop.samples_done
        self.images_at_start, self.seconds_at_start = loop.epoch_images, loop.epoch_seconds
        self.started = time.perf_counter()
        self.done = 0

    def add(self, loss: torch.Tensor, batches: int, loop: LoopState) -> None:
        """One step's mean loss over `batches` batches; the loop's position moves on."""
        self.loss_sum = self.loss_sum.to(loss.device) + (loss * batches).double()
        self.done += batches
        loop.batches_done = self.batches_at_start + self.done
        loop.samples_done = self.samples_at_start + self.done * self.batch_size * dist.world_size()

    def mean_loss(self, loop: LoopState) -> float:
        """The epoch's mean training loss so far (this process's batches; one host sync)."""
        return float(self.loss_sum) / max(loop.batches_done, 1)

    def write_into(self, loop: LoopState) -> None:
        """Bring the loop's epoch totals up to date (one host sync: at saves and the end)."""
        loop.epoch_loss_sum = float(self.loss_sum)
        loop.epoch_images = self.images_at_start + self.done * self.batch_size
        loop.epoch_seconds = self.seconds_at_start + time.perf_counter() - self.started


def _raw_and_ema(record: EpochRecord, metric: str) -> str:
    """'mAP raw 82.68, EMA 81.69' (raw only without an EMA)."""
    text = f"{metric} raw {record.raw[metric]:.2f}"
    return text + (f", EMA {record.ema[metric]:.2f}" if record.ema else "")


def _in_split_order(rows: torch.Tensor | None) -> torch.Tensor | None:
    """Rows gathered shard by shard (rank r scored samples r, r+W, r+2W, ...) put back in the
    split's order, so distributed metrics are computed exactly as a single process would."""
    world = dist.world_size()
    if rows is None or world == 1:
        return rows
    positions = torch.cat([torch.arange(rank, len(rows), world) for rank in range(world)])
    ordered = torch.empty_like(rows)
    ordered[positions] = rows
    return ordered
