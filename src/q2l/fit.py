"""The epoch loop around the engine: validation, records, checkpoints, resume and stop requests.

Promises (docs/reliability.md lists the test behind each):
- a checkpoint holds everything the next step depends on (weights, EMA, optimizer, schedule,
  scaler, loss state, position inside the epoch, every RNG), so a run resumed from any
  checkpoint continues bitwise identically on CPU;
- a checkpoint is written atomically, and no non-finite loss or gradient ever reaches one;
- a stop request (signal) is honoured at the next step boundary with a checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from q2l import dist
from q2l.checkpoint import (
    capture_rng,
    config_diff,
    link_checkpoint,
    purge_periodic,
    restore_rng,
    save_checkpoint,
)
from q2l.engine import NonFiniteError, evaluate, train_one_epoch
from q2l.metrics import compute_metrics
from q2l.preemption import StopRequest
from q2l.run_log import RunLog

log = logging.getLogger("q2l.train")

# Config keys that may differ on resume: they change how a run is watched or launched, not what
# it computes.
RESUME_IGNORED_KEYS = (
    "resume", "allow_config_change", "init_from", "trainer.progress_bar", "trainer.log_every_n_steps",
    "trainer.checkpoint_every_steps", "trainer.keep_last", "trainer.slurm_requeue", "dataset.num_workers",
    "dataset.validate", "dataset.cache_dir", "backbone.prepare", "dataset.prepare",
)

# Changes to these make the saved LR schedule stale.
SCHEDULE_KEYS = ("trainer.epochs", "schedule.", "optimizer.lr", "dataset.batch_size", "trainer.limit_train_batches")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # completed training epochs
    validated_epoch: int = 0  # the last epoch whose validation finished (a stop may interrupt it)
    step: int = 0  # optimizer steps
    batches_done: int = 0  # batches of the current (incomplete) epoch already trained on
    # The current epoch's totals so far, so that a resumed epoch's record covers the whole epoch.
    epoch_loss_sum: float = 0.0
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    best_metric: float = float("-inf")
    best_epoch: int = -1
    consecutive_skips: int = 0  # fp16 loss-scaler skips in a row
    status: str = "running"  # then completed / early_stopped: a finished run is not trained again


@dataclass
class Loop:
    """What the loop needs besides the training parts."""

    run_dir: Path
    config: dict[str, Any]
    class_names: list[str]
    device: torch.device
    run_log: RunLog
    batch_transform: Callable | None = None


def fit(cfg, parts: dict[str, Any], train_loader, val_loader, progress: Progress, loop: Loop) -> str:
    """Train and validate until `trainer.epochs`, early stop, or a stop request; returns the run status.

    Each epoch is trained, then validated; a stop request during either saves a checkpoint at once
    and returns "preempted". A run resumed from such a checkpoint picks up where it stopped,
    including an interrupted validation.
    """
    trainer = cfg.trainer
    with StopRequest() as stop:
        while True:
            if progress.validated_epoch < progress.epoch:
                record = _validate(cfg, parts, val_loader, loop.device, should_stop=lambda: bool(stop))
                if record is None:
                    return _preempted(stop, parts, progress, loop)
                status = _finish_epoch(record, train_loader, parts, progress, loop, trainer)
                if status is not None:
                    return status
            if progress.epoch >= trainer.epochs:
                progress.status = "completed"
                return progress.status
            _train_epoch_part(cfg, parts, train_loader, progress, loop, stop)
            if stop:
                return _preempted(stop, parts, progress, loop)
            progress.epoch += 1
            progress.batches_done = 0


def _finish_epoch(record: dict[str, Any], train_loader, parts, progress: Progress, loop: Loop,
                  trainer) -> str | None:
    """Log and checkpoint a validated epoch; returns the final status when training ends here."""
    steps = max(progress.batches_done, 1)
    record = {"epoch": progress.epoch, "step": progress.step,
              "train_loss": progress.epoch_loss_sum / steps,
              "train_lr": parts["optimizer"].param_groups[0]["lr"],
              "train_images_per_sec": progress.epoch_images / max(progress.epoch_seconds, 1e-9),
              "train_bad_images": getattr(train_loader.dataset, "bad_images", 0), **record}
    progress.validated_epoch = progress.epoch
    progress.batches_done = progress.epoch_images = 0
    progress.epoch_loss_sum = progress.epoch_seconds = 0.0
    improved = record["mAP_best"] > progress.best_metric  # NaN is never an improvement
    if improved:
        progress.best_metric, progress.best_epoch = record["mAP_best"], progress.epoch
    loop.run_log.log_epoch(record, progress.step)
    log.info("epoch %d/%d | loss %.4f | mAP %.2f | mAP(EMA) %s | %.0f img/s", progress.epoch, trainer.epochs,
             record["train_loss"], record["mAP"], f"{record['mAP_ema']:.2f}" if "mAP_ema" in record else "-",
             record["train_images_per_sec"])
    patience = trainer.early_stop_patience
    if patience is not None and progress.epoch - progress.best_epoch >= patience:
        log.info("early stop: no better mAP for %d epochs", patience)
        progress.status = "early_stopped"
    elif progress.epoch >= trainer.epochs:
        progress.status = "completed"
    _save(parts, progress, loop, record=record, improved=improved)
    return None if progress.status == "running" else progress.status


def _preempted(stop: StopRequest, parts, progress: Progress, loop: Loop) -> str:
    log.warning("%s received: saving at step %d and stopping", stop.requested, progress.step)
    _save(parts, progress, loop, record=None)
    return "preempted"


def _train_epoch_part(cfg, parts, train_loader, progress: Progress, loop: Loop, stop: StopRequest) -> None:
    """Train from `progress.batches_done` to the end of the epoch, or until a stop request.

    The epoch's loss, image and time totals accumulate in `progress`, so that they survive a
    checkpoint and the epoch's record covers all of it, resumed or not.
    """
    trainer = cfg.trainer
    batch_size = train_loader.batch_size
    train_loader.sampler.set_epoch(progress.epoch, start=progress.batches_done * batch_size)
    step_at_start, batches_at_start = progress.step, progress.batches_done
    totals_at_start = (progress.epoch_loss_sum, progress.epoch_images, progress.epoch_seconds)
    loss_sum = torch.zeros(())  # on the loss's device once the first step adds to it
    started = time.perf_counter()
    every = trainer.checkpoint_every_steps
    scaler = parts["scaler"]

    def sync_totals(done: int) -> None:
        """Bring the epoch totals in `progress` up to date (one host sync: at saves and the end)."""
        progress.epoch_loss_sum = totals_at_start[0] + float(loss_sum)
        progress.epoch_images = totals_at_start[1] + done * batch_size
        progress.epoch_seconds = totals_at_start[2] + time.perf_counter() - started

    def on_step(done: int, loss: torch.Tensor, skipped: bool) -> bool:
        nonlocal loss_sum
        loss_sum = loss_sum.to(loss.device) + loss
        progress.step = step_at_start + done
        progress.batches_done = batches_at_start + done
        progress.consecutive_skips = progress.consecutive_skips + 1 if skipped else 0
        if progress.consecutive_skips > trainer.max_consecutive_skipped_steps:
            raise NonFiniteError(
                f"the fp16 loss scaler skipped {progress.consecutive_skips} steps in a row (scale "
                f"{scaler.get_scale():.3g}) up to step {progress.step}: the loss is probably exploding; "
                f"lower the learning rate, clip gradients (trainer.grad_clip_norm) or use bf16")
        if stop or (every and progress.step % every == 0):
            sync_totals(done)
        if every and progress.step % every == 0 and not stop:
            _save(parts, progress, loop, record=None, periodic=True)
        return bool(stop)

    limit = trainer.limit_train_batches
    max_steps = None if limit is None else max(limit - progress.batches_done, 0)
    try:
        stats = train_one_epoch(
            parts["train_model"], train_loader, parts["loss"], parts["optimizer"], parts["scheduler"], scaler,
            loop.device, trainer.precision.value, ema=parts["ema"], grad_clip_norm=trainer.grad_clip_norm,
            channels_last=trainer.channels_last, max_steps=max_steps, global_step=progress.step,
            progress=trainer.progress_bar and dist.is_main_process(), on_step=on_step,
            check_finite=trainer.check_finite, batch_transform=loop.batch_transform)
    except NonFiniteError as error:
        last = loop.run_dir / "checkpoints" / "last.pt"
        saved = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was saved yet"
        raise NonFiniteError(f"{error}; nothing was saved from this step; {saved}") from None
    sync_totals(stats["steps"])


def _validate(cfg, parts, val_loader, device, should_stop=None) -> dict[str, Any] | None:
    """Metrics of the raw weights and, with EMA on, of the EMA weights; names the better.

    None when `should_stop()` turned true before the end (a stop request during validation).
    """
    trainer = cfg.trainer
    candidates = {"model": parts["model"]}
    if parts["ema"] is not None:
        candidates["ema"] = parts["ema"].module
    record: dict[str, Any] = {}
    for name, module in candidates.items():
        result = evaluate(module, val_loader, device, trainer.precision.value,
                          channels_last=trainer.channels_last, max_steps=trainer.limit_val_batches,
                          progress=trainer.progress_bar and dist.is_main_process(), should_stop=should_stop)
        if result is None:
            return None
        scores, targets = result
        metrics = compute_metrics(scores, targets, threshold=trainer.threshold)
        suffix = "_ema" if name == "ema" else ""
        record.update({f"{key}{suffix}": value for key, value in metrics.items()})
    ema_better = record.get("mAP_ema", -math.inf) > record["mAP"]
    record["eval_weights"] = "ema" if ema_better else "model"
    record["mAP_best"] = record["mAP_ema"] if ema_better else record["mAP"]
    return record


def _save(parts, progress: Progress, loop: Loop, record: dict | None, improved: bool = False,
          periodic: bool = False) -> None:
    """Write checkpoints/last.pt (and step-N.pt when periodic); point best.pt at it on improvement."""
    if not dist.is_main_process():
        return
    ema = parts["ema"]
    payload = {
        "model": parts["model"].state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": parts["optimizer"].state_dict(),
        "scheduler": parts["scheduler"].state_dict(),
        "scaler": parts["scaler"].state_dict(),
        "loss": parts["loss"].state_dict(),
        "progress": asdict(progress),
        "rng": capture_rng(),
        "epoch": progress.epoch,
        "step": progress.step,
        "best_metric": progress.best_metric,
        "best_epoch": progress.best_epoch,
        "eval_weights": record["eval_weights"] if record else _last_eval_weights(loop.run_log.history),
        "metrics": record or (loop.run_log.history[-1] if loop.run_log.history else {}),
        "history": loop.run_log.history,
        "class_names": [str(name) for name in loop.class_names],
        "config": loop.config,
    }
    checkpoints = loop.run_dir / "checkpoints"
    if periodic:
        save_checkpoint(payload, checkpoints / f"step-{progress.step:08d}.pt")
        purge_periodic(checkpoints, loop.config["trainer"]["keep_last"])
    save_checkpoint(payload, checkpoints / "last.pt")
    if improved:
        link_checkpoint(checkpoints / "last.pt", checkpoints / "best.pt")


def _last_eval_weights(history: list[dict]) -> str:
    return history[-1]["eval_weights"] if history else "model"


def restore(checkpoint: dict[str, Any], source: Path, parts: dict[str, Any],
            changes: list[str]) -> tuple[Progress, list[dict]]:
    """Put every stateful part back as `checkpoint` had it.

    `changes` are the accepted config changes (`resume_config_changes`); with a changed schedule
    the new schedule is followed from the saved step instead of the saved schedule state.
    """
    _load_strict(parts["model"], checkpoint["model"], source)
    if parts["ema"] is not None and checkpoint.get("ema") is not None:
        parts["ema"].module.load_state_dict(checkpoint["ema"])
    for key in ("optimizer", "scaler", "loss"):
        parts[key].load_state_dict(checkpoint[key])
    # Checkpoints of q2l 0.1 predate validated_epoch: their epochs were always validated.
    progress = Progress(**{"validated_epoch": checkpoint["progress"]["epoch"], **checkpoint["progress"]})
    if any(change.startswith(SCHEDULE_KEYS) for change in changes):
        # The saved schedule was planned for other settings: follow the new one from this step.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
            for _ in range(progress.step):
                parts["scheduler"].step()
    else:
        parts["scheduler"].load_state_dict(checkpoint["scheduler"])
    restore_rng(checkpoint["rng"])
    log.info("resumed from %s at epoch %d, step %d (%d batches into the epoch)", source, progress.epoch,
             progress.step, progress.batches_done)
    return progress, list(checkpoint.get("history", []))


def resume_config_changes(checkpoint: dict[str, Any], source: Path, config: dict[str, Any],
                          allow_config_change: bool) -> list[str]:
    """The config changes since `checkpoint`; refuses (ValueError with the diff) unless allowed."""
    changes = config_diff(checkpoint["config"], config, ignore=RESUME_IGNORED_KEYS)
    if changes and not allow_config_change:
        raise ValueError(f"resume from {source}: the config differs from the checkpoint's:\n  "
                         + "\n  ".join(changes) + "\nrerun with the original settings, or pass "
                         "allow_config_change=true to continue anyway. Nothing was changed")
    if changes:
        log.warning("resuming from %s with a changed config (allow_config_change=true):\n  %s", source,
                    "\n  ".join(changes))
    return changes


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict(strict=True) with every mismatched key named in one error."""
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        raise ValueError(f"checkpoint {source} does not fit this model: {len(mismatched)} mismatched "
                         f"{mismatched[:10]}, {len(missing)} missing {missing[:10]}, {len(unexpected)} "
                         f"unexpected {unexpected[:10]} (first 10 of each shown)")
    model.load_state_dict(state)


def init_weights(model: torch.nn.Module, checkpoint: dict[str, Any], source: Path) -> None:
    """Fine-tuning start: load every weight whose name and shape match; list the rest."""
    own = model.state_dict()
    usable = {k: v for k, v in checkpoint["model"].items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(checkpoint["model"]) - set(usable))
    fresh = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    log.info("init_from=%s: loaded %d tensors; skipped (shape or name differs) %s; newly initialised %s",
             source, len(usable), skipped, fresh)
