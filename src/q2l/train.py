"""Training entry point: compose the config, build the parts, run the epochs, keep the results.

python train.py experiment=demo                  # the demo: Q2L on embedded handwriting data
python train.py backbone=tresnet_l dataset=coco2014 dataset.root=/data/coco backbone.weights=...
python train.py -m experiment=demo loss.gamma_neg=1,2,4   # a sweep, one run directory per job
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from q2l import dist
from q2l.allocator import configure_malloc
from q2l.amp import resolve_precision
from q2l.build import build_datasets, build_model, build_state, construct, step_options
from q2l.checkpoint import (
    find_resumable,
    load_checkpoint,
    load_matching_weights,
    restore_training,
    resume_changes,
)
from q2l.checks import check_values, choice
from q2l.config import CONFIG_DIR
from q2l.data.loader import build_loader
from q2l.engine import StepOptions
from q2l.fit import Loop, Progress, fit
from q2l.models.backbone import normalization, pretrained_weights_path
from q2l.preemption import EXIT_PREEMPTED, requeue
from q2l.run_log import NullRunLog, RunLog, write_json
from q2l.rundir import RunDirectory, RunDirError, with_saved_overrides
from q2l.threads import configure_threads

log = logging.getLogger("q2l.train")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    """Run one training job; returns its best mAP (what sweepers optimise)."""
    dist.init()  # the tasks of a SLURM job join here; torchrun's processes already did in main()
    dist.quiet_other_ranks()  # after Hydra set up logging
    configure_threads(cfg.dataset.num_workers, adapt=not cfg.trainer.deterministic)
    configure_malloc(keep_freed=True)  # no page faults for what each step allocates again
    hydra_config = HydraConfig.get()
    summary = train(cfg, Path(hydra_config.runtime.output_dir), hydra=hydra_config)
    if summary["status"] == "preempted":
        if cfg.trainer.slurm_requeue:
            requeue()
        sys.exit(EXIT_PREEMPTED)
    return summary["best"]["value"]


def main() -> None:
    """`python train.py` / `q2l-train` / `torchrun ... train.py`.

    `resume=auto hydra.run.dir=X` reuses X's saved overrides. Under torchrun the processes join
    the process group before Hydra starts, and rank 0's start time names the one run directory
    they all use.
    """
    argv = with_saved_overrides(sys.argv[1:])
    if dist.launched_by_torchrun():
        if {"-m", "--multirun"} & set(argv):
            sys.exit(
                "q2l: a sweep (-m) cannot run inside torchrun; sweep with hydra/launcher=slurm "
                "(one DDP job per sweep point), or run torchrun once per setting"
            )
        dist.init()
        os.environ["Q2L_RUN_TIME"] = dist.broadcast(datetime.datetime.now().isoformat())
    sys.argv[1:] = argv
    try:
        _hydra_main()
    finally:
        dist.destroy()


def train(cfg: DictConfig, run_dir: Path, hydra: DictConfig | None = None) -> dict[str, Any]:
    """Train as `cfg` says, writing everything into `run_dir`; returns the metrics.json summary.

    An existing run in `run_dir` is written to only once the start is accepted (values valid,
    folders writable, resume config unchanged): a refused start leaves it as it was. With
    several processes, rank 0 alone checks, decides and writes; the others follow its decisions.
    """
    start = time.perf_counter()
    run = RunDirectory(run_dir)
    try:
        loaded: dict[str, Any] = {}  # what rank 0 read while checking: kept, never broadcast
        plan = dist.on_main(_open_run, cfg, run, hydra, loaded)
        if plan["finished"] is not None:
            return plan["finished"]
        return _train(cfg, run, plan["resume"], plan["changes"], start, loaded)
    except Exception as error:
        if run.started:
            _record_failure(run.path, error)
        raise
    finally:
        run.close()


def _open_run(
    cfg: DictConfig, run: RunDirectory, hydra: DictConfig | None, loaded: dict[str, Any]
) -> dict[str, Any]:
    """Rank 0's start checks, before any data is read; returns what every rank needs to know.

    Returns {"resume": checkpoint path or None, "changes": accepted config changes,
    "finished": the summary of a run that has nothing left to do, or None}. What it reads on the
    way (the loss, the init_from and resume checkpoints) goes into `loaded`, for rank 0's _train.
    """
    run.open()
    if not run.existing:
        run.start(cfg, hydra)  # a new run: record even its earliest failure
    check_values(cfg)
    run.preflight()
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    loaded["loss"] = construct(cfg.loss)  # checks the loss's own arguments
    if cfg.init_from:
        loaded["init_from"] = load_checkpoint(cfg.init_from)  # readable, and a q2l checkpoint
    resume = _find_resume(cfg, run.path)
    if not cfg.resume and run.existing and list((run.path / "checkpoints").glob("*.pt")):
        raise RunDirError(
            f"{run.path} holds a run with checkpoints, and resume=null: q2l "
            "does not train over it. Pass resume=auto to continue it, or choose another "
            "hydra.run.dir. Nothing was changed"
        )
    plan = {"resume": None, "changes": [], "finished": None}
    if resume is not None:
        source, checkpoint = resume
        if checkpoint.get("optimizer") is None:
            raise ValueError(
                f"resume={source}: it holds model weights only (an imported checkpoint), not a "
                f"training state; start a run from it with init_from={source}"
            )
        plan["changes"] = resume_changes(checkpoint, source, config, cfg.allow_config_change)
        if _finished(checkpoint["progress"], cfg.trainer.epochs):
            progress = Progress.from_checkpoint(checkpoint)
            log.info(
                "%s already finished (%s at epoch %d): nothing to do",
                run.path,
                progress.status,
                progress.epoch,
            )
            plan["finished"] = _summary(
                checkpoint.get("history", []),
                progress,
                checkpoint["step"],
                progress.status,
                0.0,
                checkpoint["config"]["trainer"].get("monitor", "mAP"),
            )
            return plan
        plan["resume"] = str(source)
        loaded["resume"] = checkpoint
    run.remove_temporaries()
    if not run.started:
        run.start(cfg, hydra)
    for step in (cfg.prepare or {}).values():
        construct(step)  # the demo's data and backbone: written once, by rank 0
    if resume is None:
        _check_weights_file(cfg.backbone)  # before the data check, which can take minutes
    return plan


def _train(
    cfg: DictConfig,
    run: RunDirectory,
    resume_path: str | None,
    changes: list[str],
    start: float,
    loaded: dict[str, Any],
) -> dict[str, Any]:
    """Build everything and fit; `loaded`: what _open_run already read (rank 0), reused."""
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    resume = None
    if resume_path is not None:
        resume = loaded.pop("resume", None) or load_checkpoint(resume_path)
    dist.seed_everything(cfg.seed, deterministic=cfg.trainer.deterministic)
    device = dist.resolve_device(cfg.trainer.device)
    precision = resolve_precision(config["trainer"]["precision"], device)
    if resume and config["trainer"]["precision"] == "auto":
        # A resumed run keeps the precision it started with, whatever auto would pick here now.
        precision = resume.get("precision", precision)
    train_set, val_set = build_datasets(
        cfg, *normalization(cfg.backbone.name, cfg.backbone.normalization)
    )
    # Resuming, the checkpoint supplies every weight: the backbone's weights file is not needed.
    model = build_model(config, train_set.num_classes, pretrained=False if resume else None)
    if cfg.init_from:
        init = loaded.pop("init_from", None) or load_checkpoint(cfg.init_from)
        load_matching_weights(model, init, Path(cfg.init_from))
    loss = loaded.pop("loss", None)
    if loss is None:  # ranks other than 0 build their own
        loss = construct(cfg.loss)
    if hasattr(loss, "align_priors"):  # class priors read with names: the data set's order
        loss.align_priors(train_set.class_names)
    state = build_state(cfg, model.to(device), loss.to(device), len(train_set), precision)
    train_loader, val_loader = (
        build_loader(
            split,
            cfg.dataset.batch_size,
            split is train_set,
            cfg.dataset.num_workers,
            cfg.seed,
            rank=dist.rank(),
            world_size=dist.world_size(),
            pin_memory=device.type == "cuda",
        )
        for split in (train_set, val_set)
    )
    progress = Progress()
    if resume:
        restore_training(state, resume, Path(resume_path), changes, dist.rank(), dist.world_size())
        progress = Progress.from_checkpoint(resume)
        progress.status = "running"  # allow_config_change may have given a finished run more epochs
        log.info(
            "resumed from %s at epoch %d, step %d (%d batches into the epoch)",
            resume_path,
            progress.epoch,
            state.step,
            progress.batches_done,
        )
    history = resume.get("history", []) if resume else []
    run_log = RunLog(run.path, history) if dist.is_main_process() else NullRunLog()
    options = step_options(cfg, device, precision, train_set.num_classes)
    eval_options = StepOptions(device, precision=precision, channels_last=cfg.trainer.channels_last)
    loop = Loop(run.path, config, train_set.class_names, run_log, options, eval_options)
    log.info(
        "run dir %s | %d train / %d val images, %d classes | device %s | %s | %d process(es), "
        "global batch %d (%d per process x %d accumulated)",
        run.path,
        len(train_set),
        len(val_set),
        train_set.num_classes,
        device,
        precision,
        dist.world_size(),
        cfg.dataset.batch_size * dist.world_size() * cfg.trainer.accumulate_grad_batches,
        cfg.dataset.batch_size,
        cfg.trainer.accumulate_grad_batches,
    )
    try:
        status = fit(state, train_loader, val_loader, cfg.trainer, progress, loop)
    finally:
        run_log.close()
    monitor = choice(cfg.trainer.monitor)
    summary = _summary(
        run_log.history, progress, state.step, status, time.perf_counter() - start, monitor
    )
    run_log.write_summary(summary)
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


def _find_resume(cfg: DictConfig, run_dir: Path) -> tuple[Path, dict] | None:
    """(source, checkpoint) for `resume` (auto: the run's newest valid checkpoint; or a path)."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = find_resumable(run_dir / "checkpoints")
        if found is None:
            log.info(
                "resume=auto: no checkpoint in %s yet, starting fresh", run_dir / "checkpoints"
            )
        return found
    return Path(cfg.resume), load_checkpoint(cfg.resume)


def _check_weights_file(backbone: DictConfig) -> None:
    """Fail now, not after the data check, when `backbone.weights` names no file."""
    if backbone.pretrained and backbone.weights:
        pretrained_weights_path(backbone.name, backbone.weights)  # raises, saying how to fix it


def _finished(progress: dict[str, Any], epochs: int) -> bool:
    """True when the checkpoint's run ended: early stopped, or `epochs` trained and validated."""
    status = progress.get("status", "running")
    return status == "early_stopped" or (status == "completed" and progress["epoch"] >= epochs)


def _summary(
    history: list[dict],
    progress: Progress,
    step: int,
    status: str,
    wall_time: float,
    monitor: str = "mAP",
) -> dict[str, Any]:
    """metrics.json: status, the monitored metric, the best epoch (by it) and the last epoch.

    Each epoch's view has `value` (the monitored score), `mAP` and `mAP_voc` (each the better of
    raw and EMA) and `weights` (raw "model" or "ema": the better by the monitored metric).
    """
    best = next((r for r in history if r["epoch"] == progress.best_epoch), None)
    final = history[-1] if history else None

    def view(record):
        if record is None:
            return {"epoch": -1, "value": float("nan"), "mAP": float("nan"), "weights": None}
        return {
            "epoch": record["epoch"],
            "value": record.get(f"{monitor}_best", record["mAP_best"]),
            "mAP": record["mAP_best"],
            "mAP_voc": record.get("mAP_voc_best"),
            "weights": record["eval_weights"],
            "metrics": record,
        }

    return {
        "status": status,
        "monitor": monitor,
        "epochs_run": progress.epoch,
        "steps": step,
        "wall_time_s": round(wall_time, 1),
        "best": view(best),
        "final": view(final),
    }


def _record_failure(run_dir: Path, error: Exception) -> None:
    """Mark metrics.json failed, with the reason, keeping what it held (sweep summaries list it)."""
    log.error("run failed: %s: %s", type(error).__name__, error)
    path = run_dir / "metrics.json"
    try:
        summary = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        summary = {}
    summary.update(status="failed", error=f"{type(error).__name__}: {error}")
    try:
        write_json(path, summary)
    except OSError:
        pass  # the run directory itself may be what failed


if __name__ == "__main__":
    main()
