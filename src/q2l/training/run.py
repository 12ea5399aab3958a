"""One training run, top to bottom: open its directory, decide how it starts, build its parts,
train, and write its summary.

    summary = train(cfg, run_dir)     # what `python train.py ...` runs for each job (q2l.cli.train)

With several processes, rank 0 alone checks, decides and writes; the others follow its decisions.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from q2l.data.loader import build_loader
from q2l.models.backbone import normalization
from q2l.training.build import build_datasets, build_model, build_state, construct, step_options
from q2l.training.checkpoint import load_checkpoint
from q2l.training.engine import StepOptions, TrainState
from q2l.training.loggers import build_loggers, run_hyperparameters
from q2l.training.loop_state import LoopState
from q2l.training.plan import Preloaded, RunPlan, plan_run
from q2l.training.preemption import StopRequest, StopRequested
from q2l.training.records import EpochRecord, run_summary
from q2l.training.resume import load_matching_weights, restore_training
from q2l.training.run_log import NullRunLog, RunLog, write_json
from q2l.training.rundir import RunDirectory
from q2l.training.trainer import RunOutputs, Trainer, TrainerSettings
from q2l.utils import dist
from q2l.utils.amp import resolve_precision
from q2l.utils.errors import is_user_error

log = logging.getLogger("q2l.train")


def train(
    cfg: DictConfig,
    run_dir: Path,
    hydra: DictConfig | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Train as `cfg` says, writing everything into `run_dir`; returns the metrics.json summary.

    An existing run in `run_dir` is written to only once the start is accepted (values valid,
    folders writable, resume config unchanged): a refused start leaves it as it was.

    `stop`: the process's stop request (q2l.training.preemption); without one, handlers are
    installed for the call. A stop signal during start-up raises StopRequested (a started run is
    marked preempted: nothing of it was lost); during training it ends the loop with a checkpoint
    and the summary's status "preempted".
    """
    if stop is None:
        with StopRequest() as own:
            return train(cfg, run_dir, hydra, own)
    start = time.perf_counter()
    config = resolved(cfg)
    run = RunDirectory(run_dir)
    preloaded = Preloaded()  # what rank 0 reads while planning: kept, never broadcast
    try:
        plan = dist.on_main(_interruptible, stop, plan_run, cfg, config, run, hydra, preloaded)
        if plan.finished is not None:
            return plan.finished
        # Start-up stops at once on a signal in one process; under several, all processes stop
        # together at the next milestone (stop.check), so none waits for one that left.
        with stop.immediately() if not dist.is_distributed() else stop.deferred():
            parts = _build(config, plan, preloaded, stop)
        with stop.deferred():
            return _fit(config, run, parts, start, stop, hydra)
    except StopRequested as stopped:
        log.warning("%s received before training started: stopping, nothing to save yet", stopped)
        if run.started:
            _record_end(run.path, "preempted", "stopped by a signal before training began")
        raise
    except Exception as error:
        kind = "" if is_user_error(error) else f"{type(error).__name__}: "
        log.error("run failed: %s%s", kind, error)
        if run.started:
            _record_end(run.path, "failed", f"{type(error).__name__}: {error}")
        raise
    finally:
        run.close()


def resolved(cfg: DictConfig) -> DictConfig:
    """The run's config as it is used and saved: interpolations resolved, choices as plain strings
    (no Enums), read-only keys as composed (a misspelled key is an error)."""
    config = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(config, True)
    return config


def _interruptible(stop: StopRequest, function, *args: Any) -> Any:
    """Run `function` where a stop signal raises StopRequested at once (rank 0's start checks:
    the other processes wait for it in q2l.utils.dist.on_main, which hands them the stop)."""
    with stop.immediately():
        return function(*args)


@dataclass
class _Parts:
    """What a run trains with, built by _build."""

    state: TrainState
    train_loader: Any
    val_loader: Any
    loop: LoopState
    history: list[EpochRecord]
    class_names: list[str]
    options: StepOptions  # training steps
    eval_options: StepOptions  # validation (no batch transform)


def _build(config: DictConfig, plan: RunPlan, preloaded: Preloaded, stop: StopRequest) -> _Parts:
    """Data, model, training state and loaders; restored from the plan's checkpoint if any."""
    resume = None
    if plan.resume_from is not None:
        resume = preloaded.resume or load_checkpoint(plan.resume_from)
    dist.seed_everything(config.seed, deterministic=config.trainer.deterministic)
    device = dist.resolve_device(config.trainer.device)
    precision = resolve_precision(config.trainer.precision, device)
    if resume and config.trainer.precision == "auto":
        # A resumed run keeps the precision it started with, whatever auto would pick here now.
        precision = resume.get("precision", precision)
    train_set, val_set = build_datasets(
        config, *normalization(config.backbone.name, config.backbone.normalization)
    )
    stop.check()
    # Resuming, the checkpoint supplies every weight: the backbone's weights file is not needed.
    model = build_model(config, train_set.num_classes, pretrained=False if resume else None)
    if config.init_from:
        init = preloaded.init_from or load_checkpoint(config.init_from)
        load_matching_weights(model, init, Path(config.init_from))
    loss = preloaded.loss or construct(config.loss)  # ranks other than 0 build their own
    if hasattr(loss, "align_priors"):  # class priors read with names: the data set's order
        loss.align_priors(train_set.class_names)
    stop.check()
    state = build_state(config, model.to(device), loss.to(device), len(train_set), precision)
    train_loader, val_loader = (
        build_loader(
            split,
            config.dataset.batch_size,
            split is train_set,
            config.dataset.num_workers,
            config.seed,
            rank=dist.rank(),
            world_size=dist.world_size(),
            pin_memory=device.type == "cuda",
        )
        for split in (train_set, val_set)
    )
    loop = LoopState()
    if resume:
        restore_training(
            state,
            resume,
            Path(plan.resume_from),
            list(plan.changes),
            dist.rank(),
            dist.world_size(),
        )
        loop = LoopState.from_checkpoint(resume, dist.rank(), dist.world_size())
        loop.status = "running"  # allow_config_change may have given a finished run more epochs
        log.info(
            "resumed from %s at epoch %d, step %d (%d batches into the epoch)",
            plan.resume_from,
            loop.epoch,
            state.step,
            loop.batches_done,
        )
    log.info(
        "%d train / %d val images, %d classes | device %s | %s | %d process(es), "
        "global batch %d (%d per process x %d accumulated)",
        len(train_set),
        len(val_set),
        train_set.num_classes,
        device,
        precision,
        dist.world_size(),
        config.dataset.batch_size * dist.world_size() * config.trainer.accumulate_grad_batches,
        config.dataset.batch_size,
        config.trainer.accumulate_grad_batches,
    )
    stop.check()
    return _Parts(
        state=state,
        train_loader=train_loader,
        val_loader=val_loader,
        loop=loop,
        history=[EpochRecord.from_json(r) for r in resume.get("history", [])] if resume else [],
        class_names=train_set.class_names,
        options=step_options(config, device, precision, train_set.num_classes),
        eval_options=StepOptions(
            device, precision=precision, channels_last=config.trainer.channels_last
        ),
    )


def _fit(
    config: DictConfig,
    run: RunDirectory,
    parts: _Parts,
    start: float,
    stop: StopRequest,
    hydra: DictConfig | None,
) -> dict[str, Any]:
    """Train to the end (or a stop), then write metrics.json; returns its summary."""
    run_log = NullRunLog()
    if dist.is_main_process():
        hparams = run_hyperparameters(config, parts.options.precision, hydra)
        run_log = RunLog(run.path, parts.history, build_loggers(config.logger, run.path), hparams)
    settings = TrainerSettings.from_config(config.trainer)
    outputs = RunOutputs(run.path, OmegaConf.to_container(config), parts.class_names, run_log)
    trainer = Trainer(
        parts.state,
        parts.train_loader,
        parts.val_loader,
        settings,
        parts.loop,
        outputs,
        parts.options,
        parts.eval_options,
        stop,
    )
    log.info("run dir %s", run.path)
    try:
        status = trainer.fit()
        summary = run_summary(
            run_log.history,
            best_epoch=parts.loop.best_epoch,
            epochs_run=parts.loop.epoch,
            steps=parts.state.step,
            status=status,
            wall_time=time.perf_counter() - start,
            monitor=settings.monitor,
        )
        run_log.write_summary(summary)
    finally:
        run_log.close()  # the loggers end their runs: with the summary, or as failed
    best = summary["best"]
    log.info(
        "done (%s): best %s %.2f at epoch %d (%s weights) in %.0f s; %s",
        status,
        summary["monitor"],
        best["value"],
        best["epoch"],
        best["weights"],
        summary["wall_time_s"],
        run.path / "checkpoints" / "best.pt",
    )
    return summary


def _record_end(run_dir: Path, status: str, reason: str) -> None:
    """Mark metrics.json `status` ("failed", "preempted") with the reason, keeping what it held
    (sweep summaries list it)."""
    path = run_dir / "metrics.json"
    try:
        summary = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        summary = {}
    summary.update(status=status, error=reason)
    try:
        write_json(path, summary)
    except OSError:
        pass  # the run directory itself may be what failed
