"""The epoch loop around the engine: validation, records, checkpoints and stop requests.

Each epoch is trained, then validated; a stop request (signal) during either is honoured at the
next step or batch with a checkpoint, and a run resumed from it continues bitwise identically on
CPU, an interrupted validation included (docs/reliability.md lists the test behind each promise).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from q2l import dist
from q2l.checkpoint import link_checkpoint, purge_periodic, save_checkpoint, training_payload
from q2l.engine import NonFiniteError, StepOptions, TrainState, evaluate, train_one_epoch
from q2l.metrics import compute_metrics
from q2l.preemption import StopRequest
from q2l.progress import track
from q2l.run_log import RunLog

log = logging.getLogger("q2l.train")


@dataclass
class Progress:
    """Where the loop stands (the step count lives in TrainState); saved in every checkpoint."""

    epoch: int = 0  # completed training epochs
    validated_epoch: int = 0  # the last epoch whose validation finished (a stop may interrupt it)
    batches_done: int = 0  # batches of the current (incomplete) epoch already trained on
    # The current epoch's totals so far, so that a resumed epoch's record covers the whole epoch.
    epoch_loss_sum: float = 0.0
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    best_metric: float = float("-inf")
    best_epoch: int = -1
    consecutive_skips: int = 0  # fp16 loss-scaler skips in a row
    status: str = "running"  # then completed / early_stopped: a finished run is not trained again

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> Progress:
        """The saved progress (q2l 0.1 checkpoints predate validated_epoch: all were validated)."""
        saved = checkpoint["progress"]
        known = {f.name for f in fields(cls)}
        return cls(
            **{"validated_epoch": saved["epoch"], **{k: v for k, v in saved.items() if k in known}}
        )


@dataclass
class Loop:
    """What the loop needs besides the training state and the trainer settings."""

    run_dir: Path
    config: dict[str, Any]
    class_names: list[str]
    run_log: RunLog
    options: StepOptions  # training steps
    eval_options: StepOptions  # validation (no batch transform)


def fit(
    state: TrainState, train_loader, val_loader, trainer: DictConfig, progress: Progress, loop: Loop
) -> str:
    """Train and validate up to `trainer.epochs`, an early stop or a stop request; return status."""
    with StopRequest() as stop:
        while True:
            if progress.validated_epoch < progress.epoch:
                record = _validate(state, val_loader, trainer, loop, should_stop=lambda: bool(stop))
                if record is None:
                    return _preempted(stop, state, progress, loop)
                status = _finish_epoch(record, train_loader, state, trainer, progress, loop)
                if status is not None:
                    return status
            if progress.epoch >= trainer.epochs:
                progress.status = "completed"
                return progress.status
            _train_epoch_part(state, train_loader, trainer, progress, loop, stop)
            if stop:
                return _preempted(stop, state, progress, loop)
            progress.epoch += 1  # batches_done keeps the epoch's count until its record is written


def _finish_epoch(
    record: dict[str, Any],
    train_loader,
    state: TrainState,
    trainer: DictConfig,
    progress: Progress,
    loop: Loop,
) -> str | None:
    """Log and checkpoint a validated epoch; returns the final status when training ends here."""
    steps = max(progress.batches_done, 1)
    record = {
        "epoch": progress.epoch,
        "step": state.step,
        "train_loss": progress.epoch_loss_sum / steps,
        "train_lr": state.optimizer.param_groups[0]["lr"],
        "train_images_per_sec": progress.epoch_images / max(progress.epoch_seconds, 1e-9),
        "train_bad_images": getattr(train_loader.dataset, "bad_images", 0),
        **record,
    }
    progress.validated_epoch = progress.epoch
    progress.batches_done = progress.epoch_images = 0  # the next epoch starts from its first batch
    progress.epoch_loss_sum = progress.epoch_seconds = 0.0
    improved = record["mAP_best"] > progress.best_metric  # NaN is never an improvement
    if improved:
        progress.best_metric, progress.best_epoch = record["mAP_best"], progress.epoch
    loop.run_log.log_epoch(record, state.step)
    log.info(
        "epoch %d/%d | loss %.4f | mAP %.2f | mAP(EMA) %s | %.0f img/s",
        progress.epoch,
        trainer.epochs,
        record["train_loss"],
        record["mAP"],
        f"{record['mAP_ema']:.2f}" if "mAP_ema" in record else "-",
        record["train_images_per_sec"],
    )
    patience = trainer.early_stop_patience
    if patience is not None and progress.epoch - progress.best_epoch >= patience:
        log.info("early stop: no better mAP for %d epochs", patience)
        progress.status = "early_stopped"
    elif progress.epoch >= trainer.epochs:
        progress.status = "completed"
    _save(state, progress, loop, record=record, improved=improved)
    return None if progress.status == "running" else progress.status


def _preempted(stop: StopRequest, state: TrainState, progress: Progress, loop: Loop) -> str:
    log.warning("%s received: saving at step %d and stopping", stop.requested, state.step)
    _save(state, progress, loop, record=None)
    return "preempted"


def _train_epoch_part(
    state: TrainState,
    train_loader,
    trainer: DictConfig,
    progress: Progress,
    loop: Loop,
    stop: StopRequest,
) -> None:
    """Train from `progress.batches_done` to the end of the epoch, or until a stop request.

    The epoch's loss, image and time totals accumulate in `progress`, so that they survive a
    checkpoint and the epoch's record covers all of it, resumed or not.
    """
    batch_size = train_loader.batch_size
    train_loader.sampler.set_epoch(progress.epoch, start=progress.batches_done * batch_size)
    batches_at_start = progress.batches_done
    totals_at_start = (progress.epoch_loss_sum, progress.epoch_images, progress.epoch_seconds)
    loss_sum = torch.zeros(())  # on the loss's device once the first step adds to it
    started = time.perf_counter()
    done = 0
    every = trainer.checkpoint_every_steps

    def sync_totals() -> None:
        """Bring the epoch totals in `progress` up to date (one host sync: at saves and the end)."""
        progress.epoch_loss_sum = totals_at_start[0] + float(loss_sum)
        progress.epoch_images = totals_at_start[1] + done * batch_size
        progress.epoch_seconds = totals_at_start[2] + time.perf_counter() - started

    def on_step(loss: torch.Tensor, skipped: bool) -> bool:
        nonlocal loss_sum, done
        loss_sum = loss_sum.to(loss.device) + loss
        done += 1
        progress.batches_done = batches_at_start + done
        progress.consecutive_skips = progress.consecutive_skips + 1 if skipped else 0
        if progress.consecutive_skips > trainer.max_consecutive_skipped_steps:
            raise NonFiniteError(
                f"the fp16 loss scaler skipped {progress.consecutive_skips} steps in a row (scale "
                f"{state.scaler.get_scale():.3g}) up to step {state.step}: the loss is probably "
                "exploding; "
                ""
                "lower the learning rate, clip gradients (trainer.grad_clip_norm) or use bf16"
            )
        if state.step % trainer.log_every_n_steps == 0:
            lr = state.optimizer.param_groups[0]["lr"]
            loop.run_log.log_step(state.step, loss=float(loss), lr=lr)
            batches.set_postfix(loss=float(loss), lr=lr)
        if stop or (every and state.step % every == 0):
            sync_totals()
        if every and state.step % every == 0 and not stop:
            _save(state, progress, loop, record=None, periodic=True)
        return bool(stop)

    remaining = len(train_loader)  # the sampler starts after the batches already done
    if trainer.limit_train_batches is not None:
        remaining = min(remaining, max(trainer.limit_train_batches - batches_at_start, 0))
    batches = _progress_bar(itertools.islice(train_loader, remaining), remaining, "train", trainer)
    try:
        train_one_epoch(state, batches, loop.options, on_step)
    except NonFiniteError as error:
        last = loop.run_dir / "checkpoints" / "last.pt"
        saved = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was saved yet"
        raise NonFiniteError(f"{error}; nothing was saved from this step; {saved}") from None
    sync_totals()


def _validate(
    state: TrainState, val_loader, trainer: DictConfig, loop: Loop, should_stop: Callable[[], bool]
) -> dict[str, Any] | None:
    """Metrics of the raw weights and, with EMA on, of the EMA weights; names the better.

    None when `should_stop()` turned true before the end (a stop request during validation).
    """
    candidates = {"": state.model}
    if state.ema is not None:
        candidates["_ema"] = state.ema.module
    total = (
        len(val_loader)
        if trainer.limit_val_batches is None
        else min(trainer.limit_val_batches, len(val_loader))
    )
    record: dict[str, Any] = {}
    results = {}
    for suffix, module in candidates.items():
        batches = _progress_bar(itertools.islice(val_loader, total), total, "eval", trainer)
        result = evaluate(module, batches, loop.eval_options, should_stop=should_stop)
        if result is None:
            return None
        results[suffix] = result
        metrics = compute_metrics(*result, threshold=trainer.threshold)
        record.update({f"{key}{suffix}": value for key, value in metrics.items()})
    ema_better = record.get("mAP_ema", -math.inf) > record["mAP"]
    record["eval_weights"] = "ema" if ema_better else "model"
    record["mAP_best"] = record["mAP_ema"] if ema_better else record["mAP"]
    scores, targets = results["_ema" if ema_better else ""]
    loop.run_log.log_validation(
        state.step, scores, targets, loop.class_names, trainer.threshold, val_loader.dataset
    )
    return record


def _progress_bar(batches, total: int, description: str, trainer: DictConfig):
    return track(
        batches, total, description, enabled=trainer.progress_bar and dist.is_main_process()
    )


def _save(
    state: TrainState,
    progress: Progress,
    loop: Loop,
    record: dict | None,
    improved: bool = False,
    periodic: bool = False,
) -> None:
    """Write checkpoints/last.pt (and step-N.pt if periodic); point best.pt at it on improvement."""
    if not dist.is_main_process():
        return
    history = loop.run_log.history
    latest = record or (history[-1] if history else {})
    payload = training_payload(
        state,
        progress=asdict(progress),
        epoch=progress.epoch,
        best_metric=progress.best_metric,
        best_epoch=progress.best_epoch,
        eval_weights=latest.get("eval_weights", "model"),
        metrics=latest,
        history=history,
        class_names=[str(name) for name in loop.class_names],
        config=loop.config,
        precision=loop.options.precision,
    )
    checkpoints = loop.run_dir / "checkpoints"
    if periodic:
        save_checkpoint(payload, checkpoints / f"step-{state.step:08d}.pt")
        purge_periodic(checkpoints, loop.config["trainer"]["keep_last"])
    save_checkpoint(payload, checkpoints / "last.pt")
    if improved:
        link_checkpoint(checkpoints / "last.pt", checkpoints / "best.pt")
