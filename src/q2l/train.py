"""Training entry point: compose the config, build the parts, run the epochs, keep the results.

python train.py experiment=demo                  # the demo: Q2L on embedded handwriting data
python train.py backbone=tresnet_l dataset=coco2014 dataset.root=/data/coco backbone.weights=...
python train.py -m experiment=demo loss.gamma_neg=1,2,4   # a sweep, one run directory per job
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3

from q2l import dist
from q2l.amp import resolve_precision
from q2l.checkpoint import (
    find_resumable,
    load_checkpoint,
    load_matching_weights,
    restore_training,
    resume_changes,
)
from q2l.config import CONFIG_DIR, build_model, check_values, construct
from q2l.data.loader import build_loader
from q2l.data.mix import build_batch_transform
from q2l.data.partial import hide_labels
from q2l.data.transforms import build_eval_transform, build_train_transform
from q2l.data.validate import validate_splits
from q2l.engine import StepOptions, TrainState
from q2l.fit import Loop, Progress, fit
from q2l.models.backbone import TimmBackbone, normalization
from q2l.preemption import EXIT_PREEMPTED, requeue_slurm_job
from q2l.run_log import RunLog, write_json
from q2l.rundir import RunDirectory, with_saved_overrides

log = logging.getLogger("q2l.train")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    """Run one training job; returns its best mAP (what sweepers optimise)."""
    hydra_config = HydraConfig.get()
    summary = train(cfg, Path(hydra_config.runtime.output_dir), hydra=hydra_config)
    if summary["status"] == "preempted":
        if cfg.trainer.slurm_requeue and dist.is_main_process():
            requeue_slurm_job()
        sys.exit(EXIT_PREEMPTED)
    return summary["best"]["mAP"]


def main() -> None:
    """`python train.py` / `q2l-train`: `resume=auto hydra.run.dir=X` reuses X's saved overrides."""
    sys.argv[1:] = with_saved_overrides(sys.argv[1:])
    _hydra_main()


def train(cfg: DictConfig, run_dir: Path, hydra: DictConfig | None = None) -> dict[str, Any]:
    """Train as `cfg` says, writing everything into `run_dir`; returns the metrics.json summary.

    An existing run in `run_dir` is written to only once the start is accepted (values valid,
    folders writable, resume config unchanged): a refused start leaves it as it was.
    """
    start = time.perf_counter()
    with RunDirectory(run_dir) as run:
        if not run.existing:
            run.start(cfg, hydra)  # a new run: record even its earliest failure
        try:
            return _train(cfg, run, hydra, start)
        except Exception as error:
            if run.started:
                _record_failure(run.path, error)
            raise


def _train(
    cfg: DictConfig, run: RunDirectory, hydra: DictConfig | None, start: float
) -> dict[str, Any]:
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    check_values(cfg)
    run.preflight()
    loss = construct(cfg.loss)  # checks the loss's own arguments before any data is read
    init_checkpoint = load_checkpoint(cfg.init_from) if cfg.init_from else None
    resume = _find_resume(cfg, run.path)
    changes = (
        resume_changes(resume[1], resume[0], config, cfg.allow_config_change) if resume else []
    )
    if resume and _finished(resume[1]["progress"], cfg.trainer.epochs):
        progress = Progress.from_checkpoint(resume[1])
        log.info(
            "%s already finished (%s at epoch %d): nothing to do",
            run.path,
            progress.status,
            progress.epoch,
        )
        return _summary(
            resume[1].get("history", []), progress, resume[1]["step"], progress.status, 0.0
        )
    run.remove_temporaries()
    if not run.started:
        run.start(cfg, hydra)
    for step in (cfg.prepare or {}).values():
        construct(step)
    if not resume:
        _check_weights_file(cfg.backbone)  # before the data check, which can take minutes

    dist.seed_everything(cfg.seed, deterministic=cfg.trainer.deterministic)
    device = dist.resolve_device(cfg.trainer.device)
    # A resumed run keeps the precision it started with, whatever `auto` would pick here now.
    precision = resume[1].get("precision") if resume else None
    precision = precision or resolve_precision(config["trainer"]["precision"], device)
    train_set, val_set = _build_datasets(cfg, *normalization(cfg.backbone.name))
    # Resuming, the checkpoint supplies every weight: the backbone's weights file is not needed.
    model = build_model(config, train_set.num_classes, pretrained=False if resume else None)
    state = _build_state(cfg, model.to(device), loss.to(device), len(train_set), precision)
    train_loader = build_loader(
        train_set,
        cfg.dataset.batch_size,
        True,
        cfg.dataset.num_workers,
        cfg.seed,
        pin_memory=device.type == "cuda",
    )
    val_loader = build_loader(
        val_set,
        cfg.dataset.batch_size,
        False,
        cfg.dataset.num_workers,
        pin_memory=device.type == "cuda",
    )
    if init_checkpoint is not None:
        load_matching_weights(model, init_checkpoint, Path(cfg.init_from))
    progress = Progress()
    if resume:
        restore_training(state, resume[1], resume[0], changes)
        progress = Progress.from_checkpoint(resume[1])
        progress.status = "running"  # allow_config_change may have given a finished run more epochs
        log.info(
            "resumed from %s at epoch %d, step %d (%d batches into the epoch)",
            resume[0],
            progress.epoch,
            state.step,
            progress.batches_done,
        )
    run_log = RunLog(run.path, resume[1].get("history", []) if resume else [])
    options = StepOptions(
        device,
        precision,
        cfg.trainer.channels_last,
        cfg.trainer.grad_clip_norm,
        cfg.trainer.check_finite,
        _build_batch_transform(cfg, train_set.num_classes),
    )
    loop = Loop(
        run.path,
        config,
        train_set.class_names,
        run_log,
        options,
        StepOptions(device, precision, cfg.trainer.channels_last),
    )
    log.info(
        "run dir %s | %d train / %d val images, %d classes | device %s | %s",
        run.path,
        len(train_set),
        len(val_set),
        train_set.num_classes,
        device,
        precision,
    )
    try:
        status = fit(state, train_loader, val_loader, cfg.trainer, progress, loop)
    finally:
        run_log.close()
    summary = _summary(run_log.history, progress, state.step, status, time.perf_counter() - start)
    run_log.write_summary(summary)
    best = summary["best"]
    log.info(
        "done (%s): best mAP %.2f at epoch %d (%s weights) in %.0f s; %s",
        status,
        best["mAP"],
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
    if (
        backbone.pretrained
        and backbone.weights
        and not Path(backbone.weights).expanduser().is_file()
    ):
        TimmBackbone(
            backbone.name, pretrained=True, weights=backbone.weights
        )  # raises, saying how to fix it


def _finished(progress: dict[str, Any], epochs: int) -> bool:
    """True when the checkpoint's run ended: early stopped, or `epochs` trained and validated."""
    status = progress.get("status", "running")
    return status == "early_stopped" or (status == "completed" and progress["epoch"] >= epochs)


def _build_datasets(cfg: DictConfig, mean: tuple[float, ...], std: tuple[float, ...]):
    """Train and val splits with their transforms, normalised as the backbone expects, checked.

    Annotation problems surface here with the format reader's message; dataset.partial then hides
    training labels, and _validate_data checks the files, all before the model is built.
    """
    data = cfg.dataset
    size = data.image_size
    augment = OmegaConf.to_container(cfg.augment, enum_to_str=True)
    augment.pop("mix", None)  # a batch transform, not an image one: _build_batch_transform
    loading = {"on_bad_image": _text(data.on_bad_image), "max_bad_fraction": data.max_bad_fraction}
    train_set = construct(
        data.train, transform=build_train_transform(size, mean, std, **augment), **loading
    )
    val_set = construct(data.val, transform=build_eval_transform(size, mean, std), **loading)
    if train_set.class_names != val_set.class_names:
        raise ValueError(
            "train and val splits have different classes: "
            f"{sorted(set(train_set.class_names) ^ set(val_set.class_names))}"
        )
    if data.partial.keep_ratio < 1.0:
        train_set.labels = hide_labels(
            train_set.labels, data.partial.keep_ratio, seed=data.partial.seed
        )
        log.info(
            "partial labels: kept %.0f%% of each training image's labels "
            "(dataset.partial.keep_ratio=%s)",
            100 * data.partial.keep_ratio,
            data.partial.keep_ratio,
        )
    _validate_data(cfg, train_set, val_set)
    return train_set, val_set


def _validate_data(cfg: DictConfig, train_set, val_set) -> None:
    """Check both splits' image files (dataset.validate quick/full/off); raise naming every problem.

    With on_bad_image=skip, up to max_bad_fraction of a split may be missing or unreadable
    (warnings). Unknown (-1) training targets are refused with loss=asl, which would read them as
    probabilities.
    """
    data = cfg.dataset
    unknown = int((train_set.labels == -1).sum())
    if unknown and str(cfg.loss.get("_target_", "")).endswith(".AsymmetricLoss"):
        raise ValueError(
            f"the training labels hold {unknown} unknown (-1) entries, which loss=asl would read "
            "as "
            ""
            "probabilities; use loss=partial_asl or loss=bce (or, for VOC, "
            "dataset.difficult=positive)"
        )
    level = _text(data.validate)
    if level == "off":
        log.warning("dataset.validate=off: image files are not checked before training")
        return
    skip = _text(data.on_bad_image) == "skip"
    report = validate_splits(
        train_set, val_set, level=level, bad_image_tolerance=data.max_bad_fraction if skip else None
    )
    log.info(
        "data checked (%s, %.1f s): %d train / %d val images, %d classes, no problems",
        level,
        report.seconds,
        len(train_set),
        len(val_set),
        train_set.num_classes,
    )
    for warning in report.warnings:
        log.warning("data: %s", warning)


def _build_batch_transform(cfg: DictConfig, num_classes: int):
    """MixUp/CutMix as augment.mix says, or None."""
    mix = OmegaConf.to_container(cfg.augment.mix, enum_to_str=True)
    batch_transform = build_batch_transform(
        mix, num_classes=num_classes, batch_size=cfg.dataset.batch_size
    )
    if batch_transform is not None and str(cfg.loss.get("_target_", "")).endswith(
        ".PartialAsymmetricLoss"
    ):
        log.warning(
            "augment.mix makes soft targets, which loss=partial_asl gives no loss; prefer asl or "
            "bce"
        )
    return batch_transform


def _text(value: Any) -> str:
    """A config choice as a string: typed configs hold Enum members, plain ones strings."""
    return str(getattr(value, "value", value))


def _build_state(
    cfg: DictConfig, model: torch.nn.Module, loss: torch.nn.Module, num_images: int, precision: str
) -> TrainState:
    """Optimizer, per-step schedule, grad scaler and weight EMA around `model` (on its device)."""
    steps_per_epoch = num_images // cfg.dataset.batch_size  # training drops the last partial batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training split has {num_images} images, fewer than "
            f"dataset.batch_size={cfg.dataset.batch_size}"
        )
    steps_per_epoch = min(steps_per_epoch, cfg.trainer.limit_train_batches or steps_per_epoch)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = instantiate(cfg.optimizer)(model)
    scheduler = instantiate(cfg.schedule)(
        optimizer, total_steps=steps_per_epoch * cfg.trainer.epochs, steps_per_epoch=steps_per_epoch
    )
    ema = (
        ModelEmaV3(model, decay=cfg.trainer.ema_decay, use_warmup=cfg.trainer.ema_warmup)
        if cfg.trainer.ema_decay > 0
        else None
    )
    device_type = next(model.parameters()).device.type
    return TrainState(
        model=model,
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        # Only fp16 needs loss scaling; for bf16/fp32 the disabled scaler is a pass-through.
        scaler=torch.amp.GradScaler(device_type, enabled=precision == "fp16"),
        ema=ema,
        forward=torch.compile(model) if cfg.trainer.compile else model,
    )


def _summary(
    history: list[dict], progress: Progress, step: int, status: str, wall_time: float
) -> dict[str, Any]:
    """metrics.json: status, the best epoch and the last epoch."""
    best = next((r for r in history if r["epoch"] == progress.best_epoch), None)
    final = history[-1] if history else None

    def view(record):
        if record is None:
            return {"epoch": -1, "mAP": float("nan"), "weights": None}
        return {
            "epoch": record["epoch"],
            "mAP": record["mAP_best"],
            "weights": record["eval_weights"],
            "metrics": record,
        }

    return {
        "status": status,
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
