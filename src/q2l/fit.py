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
from q2l.checkpoint import (
    capture_rng,
    link_checkpoint,
    non_finite_parts,
    purge_periodic,
    save_checkpoint,
    training_payload,
)
from q2l.checks import choice
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
    # The regular (raw) and EMA models' own bests, for trainer.early_stop_rule=official.
    best_raw_metric: float = float("-inf")
    best_raw_epoch: int = -1
    best_ema_metric: float = float("-inf")
    consecutive_skips: int = 0  # fp16 loss-scaler skips in a row
    status: str = "running"  # then completed / early_stopped: a finished run is not trained again

    @classmethod
    def from_checkpoint(
        cls, checkpoint: dict[str, Any], rank: int = 0, world_size: int = 1
    ) -> Progress:
        """The saved progress, with this process's own epoch totals (q2l 0.1 checkpoints predate
        validated_epoch: all were validated).

        Checkpoints hold every process's totals in `progress["rank_totals"]`; resumed on another
        number of processes, rank 0 carries the whole sum so far and the others start from 0.
        """
        saved = dict(checkpoint["progress"])
        known = {f.name for f in fields(cls)}
        progress = cls(
            **{"validated_epoch": saved["epoch"], **{k: v for k, v in saved.items() if k in known}}
        )
        totals = saved.get("rank_totals")
        if totals is not None:
            if len(totals) == world_size:
                mine = totals[rank]
            else:
                mine = [sum(column) for column in zip(*totals, strict=True)] if rank == 0 else None
            progress.epoch_loss_sum, progress.epoch_images, progress.epoch_seconds = (
                mine if mine is not None else (0.0, 0, 0.0)
            )
        return progress

    def totals(self) -> tuple[float, int, float]:
        """This process's epoch totals so far: (loss sum, images, seconds)."""
        return self.epoch_loss_sum, self.epoch_images, self.epoch_seconds


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
    state: TrainState,
    train_loader,
    val_loader,
    trainer: DictConfig,
    progress: Progress,
    loop: Loop,
    stop: StopRequest,
) -> str:
    """Train and validate up to `trainer.epochs`, an early stop or a stop request; return status.

    `stop` is polled at every step (its handlers only set a flag inside `fit`). Every decision is
    taken by all ranks together: a stop request on any rank stops all of them at the same step,
    and every rank gets the validation record rank 0 computed.
    """
    try:
        with stop.deferred():
            return _epochs(state, train_loader, val_loader, trainer, progress, loop, stop)
    except NonFiniteError as error:
        # Every checkpoint is checked finite before it is written, so last.pt is a good one.
        last = loop.run_dir / "checkpoints" / "last.pt"
        kept = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was saved yet"
        raise NonFiniteError(f"{error}; nothing was saved from this step; {kept}") from None


def _epochs(
    state: TrainState,
    train_loader,
    val_loader,
    trainer: DictConfig,
    progress: Progress,
    loop: Loop,
    stop: StopRequest,
) -> str:
    """fit's loop: validate what was trained, then train the next epoch, until the end."""
    while True:
        if progress.validated_epoch < progress.epoch:
            # Under DDP the ranks' shards differ by a batch at most, so validation cannot stop
            # in the middle in step; a stop request is then honoured right after it.
            local_stop = None if dist.is_distributed() else (lambda: bool(stop))
            record = _validate(state, val_loader, trainer, loop, should_stop=local_stop)
            if record is None or dist.any_rank(bool(stop)):
                return _preempted(stop, state, progress, loop)
            status = _finish_epoch(record, train_loader, state, trainer, progress, loop)
            if status is not None:
                return status
        if progress.epoch >= trainer.epochs:
            progress.status = "completed"
            return progress.status
        if _train_epoch_part(state, train_loader, trainer, progress, loop, stop):
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
    steps = max(progress.batches_done, 1) * dist.world_size()
    record = {
        "epoch": progress.epoch,
        "step": state.step,
        "train_loss": dist.sum_over_ranks(progress.epoch_loss_sum) / steps,
        "train_lr": state.optimizer.param_groups[0]["lr"],
        "train_images_per_sec": dist.sum_over_ranks(progress.epoch_images)
        / max(progress.epoch_seconds, 1e-9),
        "train_bad_images": int(
            dist.sum_over_ranks(getattr(train_loader.dataset, "bad_images", 0))
        ),
        **record,
    }
    progress.validated_epoch = progress.epoch
    progress.batches_done = progress.samples_done = progress.epoch_images = 0  # next epoch: from 0
    progress.epoch_loss_sum = progress.epoch_seconds = 0.0
    improved = _track_bests(record, progress, monitor=record["monitor"])
    loop.run_log.log_epoch(record, state.step)
    log.info(
        "epoch %d/%d | loss %.4f | mAP %.2f | mAP(EMA) %s | mAP_voc %.2f | %.0f img/s",
        progress.epoch,
        trainer.epochs,
        record["train_loss"],
        record["mAP"],
        f"{record['mAP_ema']:.2f}" if "mAP_ema" in record else "-",
        record["mAP_voc_best"],
        record["train_images_per_sec"],
    )
    if _early_stop(record, progress, trainer):
        log.info(
            "early stop (%s rule): no better %s for %d epochs",
            choice(trainer.early_stop_rule),
            record["monitor"],
            trainer.early_stop_patience,
        )
        progress.status = "early_stopped"
    elif progress.epoch >= trainer.epochs:
        progress.status = "completed"
    _save(state, progress, loop, record=record, improved=improved)
    return None if progress.status == "running" else progress.status


def _track_bests(record: dict[str, Any], progress: Progress, monitor: str) -> bool:
    """Fold the epoch's monitored scores into `progress`; True when the best improved."""
    improved = record[f"{monitor}_best"] > progress.best_metric  # NaN is never an improvement
    if improved:
        progress.best_metric, progress.best_epoch = record[f"{monitor}_best"], progress.epoch
    if record[monitor] > progress.best_raw_metric:
        progress.best_raw_metric, progress.best_raw_epoch = record[monitor], progress.epoch
    ema = record.get(f"{monitor}_ema")
    if ema is not None and ema > progress.best_ema_metric:
        progress.best_ema_metric = ema
    return improved


def _early_stop(record: dict[str, Any], progress: Progress, trainer: DictConfig) -> bool:
    """Whether trainer.early_stop_patience and trainer.early_stop_rule end training here.

    "best": the best monitored score is `patience` epochs old. "official" (main_mlc.py): more than
    `patience` epochs have passed since the later of the best epoch and the regular model's best
    epoch, at least two epochs were validated, and the last EMA score (the raw one without EMA)
    is below the best EMA score.
    """
    patience = trainer.early_stop_patience
    if patience is None:
        return False
    if choice(trainer.early_stop_rule) == "best":
        return progress.epoch - progress.best_epoch >= patience
    monitor = record["monitor"]
    has_ema = f"{monitor}_ema" in record
    last = record[f"{monitor}_ema"] if has_ema else record[monitor]
    best = progress.best_ema_metric if has_ema else progress.best_raw_metric
    since = progress.epoch - max(progress.best_epoch, progress.best_raw_epoch)
    return progress.best_epoch >= 1 and since > patience and progress.epoch > 1 and last < best


def _preempted(stop: StopRequest, state: TrainState, progress: Progress, loop: Loop) -> str:
    log.warning("%s received: saving at step %d and stopping", stop.requested or "stop", state.step)
    _save(state, progress, loop, record=None)
    return "preempted"


def _train_epoch_part(
    state: TrainState,
    train_loader,
    trainer: DictConfig,
    progress: Progress,
    loop: Loop,
    stop: StopRequest,
) -> bool:
    """Train from where the epoch stands to its end; returns True when a stop request ended it.

    The epoch's loss, image and time totals accumulate in `progress`, so that they survive a
    checkpoint and the epoch's record covers all of it, resumed or not.
    """
    batch_size = train_loader.batch_size
    train_loader.sampler.set_epoch(progress.epoch, start=progress.samples_done)
    batches_at_start, samples_at_start = progress.batches_done, progress.samples_done
    images_at_start, seconds_at_start = progress.epoch_images, progress.epoch_seconds
    # float64, continuing from the saved sum: a resumed epoch adds the same numbers in the same
    # order as an uninterrupted one, so its loss is bitwise the same. On the loss's device once
    # the first step adds to it (no host sync per step).
    loss_sum = torch.tensor(progress.epoch_loss_sum, dtype=torch.float64)
    started = time.perf_counter()
    done = 0
    stopped = False
    every = trainer.checkpoint_every_steps

    def sync_totals() -> None:
        """Bring the epoch totals in `progress` up to date (one host sync: at saves and the end)."""
        progress.epoch_loss_sum = float(loss_sum)
        progress.epoch_images = images_at_start + done * batch_size
        progress.epoch_seconds = seconds_at_start + time.perf_counter() - started

    def on_step(loss: torch.Tensor, skipped: bool, batches: int) -> bool:
        nonlocal loss_sum, done, stopped
        # loss is the mean over the step's batches
        loss_sum = loss_sum.to(loss.device) + (loss * batches).double()
        done += batches
        progress.batches_done = batches_at_start + done
        progress.samples_done = samples_at_start + done * batch_size * dist.world_size()
        progress.consecutive_skips = progress.consecutive_skips + 1 if skipped else 0
        if progress.consecutive_skips > trainer.max_consecutive_skipped_steps:
            raise NonFiniteError(
                f"the fp16 loss scaler skipped {progress.consecutive_skips} steps in a row (scale "
                f"{state.scaler.get_scale():.3g}) up to step {state.step}: the loss is probably "
                "exploding; lower the learning rate, clip gradients (trainer.grad_clip_norm) or "
                "use bf16"
            )
        if state.step % trainer.log_every_n_steps == 0:
            lr = state.optimizer.param_groups[0]["lr"]
            value = float(loss)  # one host copy for the log and the bar
            loop.run_log.log_step(state.step, loss=value, lr=lr)
            bar.set_postfix(loss=value, lr=lr)
        stopped = dist.any_rank(bool(stop))
        periodic = bool(every) and state.step % every == 0
        if stopped or periodic:
            sync_totals()
        if periodic and not stopped:
            _save(state, progress, loop, record=None, periodic=True)
        return stopped

    remaining = len(train_loader)  # the sampler starts after the samples already consumed
    if trainer.limit_train_batches is not None:
        remaining = min(remaining, max(trainer.limit_train_batches - batches_at_start, 0))
    bar = _progress_bar(itertools.islice(train_loader, remaining), remaining, "train", trainer)
    train_one_epoch(state, bar, loop.options, on_step)
    sync_totals()
    return stopped


def _validate(
    state: TrainState,
    val_loader,
    trainer: DictConfig,
    loop: Loop,
    should_stop: Callable[[], bool] | None,
) -> dict[str, Any] | None:
    """Metrics of the raw weights and, with EMA on, of the EMA weights; names the better.

    For mAP and mAP_voc the record holds `<metric>_best`, the better of raw and EMA; the
    monitored one (trainer.monitor, named in `monitor`) picks `eval_weights`.

    Each rank scores its own unpadded shard of the val split; rank 0 computes the metrics over
    all of them (every image exactly once) and hands the record to every rank. None when
    `should_stop()` turned true before the end (a stop request during validation).
    """
    candidates = {"": state.model}
    if state.ema is not None:
        candidates["_ema"] = state.ema.module
    total = len(val_loader)
    if trainer.limit_val_batches is not None:
        total = min(trainer.limit_val_batches, total)
    record: dict[str, Any] = {}
    results = {}
    for suffix, module in candidates.items():
        dist.broadcast_module_buffers(module)  # every replica is the model rank 0 saves
        batches = _progress_bar(itertools.islice(val_loader, total), total, "eval", trainer)
        result = evaluate(module, batches, loop.eval_options, should_stop=should_stop)
        if result is None:
            return None
        scores, targets = (_in_split_order(dist.gather_rows(rows)) for rows in result)
        if dist.is_main_process():
            metrics = compute_metrics(scores, targets, threshold=trainer.threshold)
            record.update({f"{key}{suffix}": value for key, value in metrics.items()})
            results[suffix] = scores, targets
    if dist.is_main_process():
        monitor = choice(trainer.monitor)
        for metric in ("mAP", "mAP_voc"):
            ema_better = record.get(f"{metric}_ema", -math.inf) > record[metric]
            record[f"{metric}_best"] = record[f"{metric}_ema"] if ema_better else record[metric]
            if metric == monitor:
                record["eval_weights"] = "ema" if ema_better else "model"
        record["monitor"] = monitor
        scores, targets = results["_ema" if record["eval_weights"] == "ema" else ""]
        loop.run_log.log_validation(
            state.step, scores, targets, loop.class_names, trainer.threshold, val_loader.dataset
        )
    return dist.broadcast(record)


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
    """Write checkpoints/last.pt (and step-N.pt if periodic); point best.pt at it on improvement.

    Called on every rank: each rank's random streams and epoch totals go into rank 0's
    checkpoint. Weights or optimizer state that stopped being finite are never saved: every rank
    raises NonFiniteError, and the checkpoints already written (all finite) stay as they were.
    """
    checkpoints = loop.run_dir / "checkpoints"
    broken = non_finite_parts(state)
    if dist.any_rank(bool(broken)):
        raise NonFiniteError(
            f"after step {state.step} the {' and '.join(broken) or 'state on another process'} "
            "hold non-finite values (the update diverged: lower the learning rate or clip "
            "gradients, trainer.grad_clip_norm)"
        )
    rank_state = dist.gather_objects((capture_rng(), progress.totals()))
    if not dist.is_main_process():
        return
    history = loop.run_log.history
    latest = record or (history[-1] if history else {})
    payload = training_payload(
        state,
        [rng for rng, _ in rank_state],
        progress={**asdict(progress), "rank_totals": [totals for _, totals in rank_state]},
        epoch=progress.epoch,
        best_metric=progress.best_metric,
        best_epoch=progress.best_epoch,
        eval_weights=latest.get("eval_weights", "model"),
        metrics=latest,
        history=history,
        class_names=[str(name) for name in loop.class_names],
        config=loop.config,
        precision=loop.options.precision,
        world_size=dist.world_size(),
    )
    if periodic:
        save_checkpoint(payload, checkpoints / f"step-{state.step:08d}.pt")
        purge_periodic(checkpoints, loop.config["trainer"]["keep_last"])
    save_checkpoint(payload, checkpoints / "last.pt")
    if improved:
        link_checkpoint(checkpoints / "last.pt", checkpoints / "best.pt")
