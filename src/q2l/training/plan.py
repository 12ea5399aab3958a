"""How a run starts, decided before any data is read: new, resumed (from which checkpoint, with
which accepted config changes) or already finished; and whether the start is allowed at all.

Rank 0 decides (`plan_run`, through q2l.utils.dist.on_main) and every rank gets the `RunPlan`. A
refused start (busy or foreign run directory, impossible value, changed config on resume, a
weights file that is not there) raises before anything is written into an existing run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from q2l.config.checks import check_values
from q2l.models.backbone import pretrained_weights_path
from q2l.training.build import construct
from q2l.training.checkpoint import find_resumable, load_checkpoint
from q2l.training.loggers import check_packages
from q2l.training.loop_state import LoopState
from q2l.training.records import EpochRecord, run_summary
from q2l.training.resume import resume_changes
from q2l.training.rundir import RunDirectory, RunDirError
from q2l.utils.errors import InputError

log = logging.getLogger("q2l.train")


@dataclass(frozen=True)
class RunPlan:
    """Rank 0's decision, shared with every rank.

    resume_from: the checkpoint to continue from, or None for a fresh start.
    changes: the config changes accepted on resume (`key: old -> new`, allow_config_change).
    finished: the summary (metrics.json) of a run that has nothing left to do, or None.
    """

    resume_from: str | None = None
    changes: tuple[str, ...] = ()
    finished: dict[str, Any] | None = None


@dataclass
class Preloaded:
    """What rank 0 read while deciding, reused when it builds the run (never sent to the other
    ranks, which read their own)."""

    loss: nn.Module | None = None
    init_from: dict[str, Any] | None = None
    resume: dict[str, Any] | None = None


def plan_run(
    cfg: DictConfig,
    config: DictConfig,
    run: RunDirectory,
    hydra: DictConfig | None,
    preloaded: Preloaded,
) -> RunPlan:
    """Rank 0's start checks and decision; `cfg` as composed (for .hydra/), `config` resolved.

    A new run is marked started at once (so even its earliest failure is recorded); an existing
    one only once the start is accepted.
    """
    run.open()
    if not run.existing:
        run.start(cfg, hydra)
    check_values(config)
    check_packages(config.logger)  # logger=mlflow without mlflow fails now, not after the data
    run.preflight()
    preloaded.loss = construct(config.loss)  # checks the loss's own arguments
    if config.init_from:
        preloaded.init_from = load_checkpoint(config.init_from)  # readable, a q2l checkpoint
    found = _find_resume(config, run.path)
    if not config.resume and run.existing and list((run.path / "checkpoints").glob("*.pt")):
        raise RunDirError(
            f"{run.path} holds a run with checkpoints, and resume=null: q2l does not train over "
            "it. Pass resume=auto to continue it, or choose another hydra.run.dir. Nothing was "
            "changed"
        )
    plan = RunPlan()
    if found is not None:
        source, checkpoint = found
        if checkpoint.get("optimizer") is None:
            raise InputError(
                f"resume={source}: it holds model weights only (an imported checkpoint), not a "
                f"training state; start a run from it with init_from={source}"
            )
        changes = resume_changes(
            checkpoint, source, OmegaConf.to_container(config), config.allow_config_change
        )
        if _finished(checkpoint["progress"], config.trainer.epochs):
            return RunPlan(finished=_finished_summary(run.path, checkpoint))
        plan = RunPlan(resume_from=str(source), changes=tuple(changes))
        preloaded.resume = checkpoint
    run.remove_temporaries()
    if not run.started:
        run.start(cfg, hydra)
    for step in (config.prepare or {}).values():
        construct(step)  # the demo's data and backbone: written once, by rank 0
    if found is None:
        _check_weights_file(config.backbone)  # before the data check, which can take minutes
    return plan


def _find_resume(config: DictConfig, run_dir: Path) -> tuple[Path, dict] | None:
    """(source, checkpoint) for `resume` (auto: the run's newest valid checkpoint; or a path)."""
    if not config.resume:
        return None
    if config.resume == "auto":
        found = find_resumable(run_dir / "checkpoints")
        if found is None:
            log.info(
                "resume=auto: no checkpoint in %s yet, starting fresh", run_dir / "checkpoints"
            )
        return found
    return Path(config.resume), load_checkpoint(config.resume)


def _finished(progress: dict[str, Any], epochs: int) -> bool:
    """True when the checkpoint's run ended: early stopped, or `epochs` trained and validated."""
    status = progress.get("status", "running")
    return status == "early_stopped" or (status == "completed" and progress["epoch"] >= epochs)


def _finished_summary(run_dir: Path, checkpoint: dict[str, Any]) -> dict[str, Any]:
    loop = LoopState.from_checkpoint(checkpoint)
    log.info(
        "%s already finished (%s at epoch %d): nothing to do", run_dir, loop.status, loop.epoch
    )
    return run_summary(
        [EpochRecord.from_json(record) for record in checkpoint.get("history", [])],
        best_epoch=loop.best_epoch,
        epochs_run=loop.epoch,
        steps=checkpoint["step"],
        status=loop.status,
        wall_time=0.0,
        monitor=checkpoint["config"]["trainer"]["monitor"],
    )


def _check_weights_file(backbone: DictConfig) -> None:
    """Find (or download) the backbone's pretrained weights now, before the data check, which can
    take minutes: a missing file fails at once, saying which file to supply and how. Under
    several processes rank 0 downloads; the others then find the file in the cache."""
    if backbone.pretrained:
        pretrained_weights_path(backbone.name, backbone.weights)
