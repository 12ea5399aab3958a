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
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3

from q2l import dist
from q2l.checkpoint import find_resumable, load_checkpoint
from q2l.config import CONFIG_DIR, check_values
from q2l.data.loader import build_loader
from q2l.data.mix import build_batch_transform
from q2l.data.partial import hide_labels
from q2l.data.transforms import build_eval_transform, build_train_transform
from q2l.data.validate import validate_splits
from q2l.fit import Loop, Progress, fit, init_weights, restore, resume_config_changes
from q2l.models import build_model
from q2l.models.backbone import normalization
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
    """`python train.py ...` / `q2l-train ...`: `resume=auto hydra.run.dir=X` reuses X's overrides."""
    sys.argv[1:] = with_saved_overrides(sys.argv[1:])
    _hydra_main()


def train(cfg: DictConfig, run_dir: Path, hydra: DictConfig | None = None) -> dict[str, Any]:
    """Train as `cfg` says, writing everything into `run_dir`; returns the metrics.json summary.

    An existing run in `run_dir` is written to only once the start is accepted (values valid,
    folders writable, resume config unchanged): a refused start leaves it as it was.
    """
    start = time.perf_counter()
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    with RunDirectory(run_dir) as run:
        if not run.existing:
            run.start(cfg, hydra)  # a new run: record even its earliest failure
        try:
            return _train(cfg, config, run, hydra, start)
        except Exception as error:
            if run.started:
                _record_failure(run.path, error)
            raise


def _train(cfg: DictConfig, config: dict, run: RunDirectory, hydra: DictConfig | None, start: float):
    check_values(cfg)
    run.preflight()
    loss = instantiate(cfg.loss)  # checks the loss's own arguments before any data is read
    init_checkpoint = load_checkpoint(cfg.init_from) if cfg.init_from else None
    resume = _find_resume(cfg, run.path)
    changes = resume_config_changes(resume[1], resume[0], config, cfg.allow_config_change) if resume else []
    if resume and _finished(resume[1]["progress"], cfg.trainer.epochs):
        progress = Progress(**resume[1]["progress"])
        log.info("%s already finished (%s at epoch %d): nothing to do", run.path, progress.status, progress.epoch)
        return _summary(resume[1].get("history", []), progress, progress.status, 0.0)
    run.remove_temporaries()
    if not run.started:
        run.start(cfg, hydra)
    dist.seed_everything(cfg.seed, deterministic=cfg.trainer.deterministic)
    device = dist.resolve_device(cfg.trainer.device)
    for group in ("dataset", "backbone"):
        if cfg[group].get("prepare"):
            _instantiate(cfg[group].prepare)

    train_set, val_set = _build_datasets(cfg, *normalization(cfg.backbone.name))
    model = build_model(config["backbone"], config["model"], train_set.num_classes, cfg.dataset.image_size)
    model.to(device, memory_format=torch.channels_last if cfg.trainer.channels_last else torch.preserve_format)
    train_loader = build_loader(train_set, cfg.dataset.batch_size, True, cfg.dataset.num_workers, cfg.seed,
                                pin_memory=device.type == "cuda")
    val_loader = build_loader(val_set, cfg.dataset.batch_size, False, cfg.dataset.num_workers,
                              pin_memory=device.type == "cuda")
    parts = _build_training_parts(cfg, model, loss.to(device), len(train_loader))
    if init_checkpoint is not None:
        init_weights(model, init_checkpoint, Path(cfg.init_from))
    progress, history = restore(resume[1], resume[0], parts, changes) if resume else (Progress(), [])
    if progress.status != "running":
        progress.status = "running"  # allow_config_change gave a finished run more epochs
    run_log = RunLog(run.path, history)
    log.info("run dir %s | %d train / %d val images, %d classes | device %s | %s",
             run.path, len(train_set), len(val_set), train_set.num_classes, device, cfg.trainer.precision.value)
    loop = Loop(run.path, config, train_set.class_names, device, run_log,
                batch_transform=_build_batch_transform(cfg, train_set.num_classes))
    try:
        status = fit(cfg, parts, train_loader, val_loader, progress, loop)
    finally:
        run_log.close()
    summary = _summary(run_log.history, progress, status, time.perf_counter() - start)
    run_log.write_summary(summary)
    best = summary["best"]
    log.info("done (%s): best mAP %.2f at epoch %d (%s weights) in %.0f s; %s", status, best["mAP"],
             best["epoch"], best["weights"], summary["wall_time_s"], run.path / "checkpoints" / "best.pt")
    return summary


def _find_resume(cfg: DictConfig, run_dir: Path) -> tuple[Path, dict] | None:
    """(source, checkpoint) for `resume` (auto: this run's newest valid checkpoint; or a path), or None."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = find_resumable(run_dir / "checkpoints")
        if found is None:
            log.info("resume=auto: no checkpoint in %s yet, starting fresh", run_dir / "checkpoints")
        return found
    return Path(cfg.resume), load_checkpoint(cfg.resume)


def _finished(progress: dict[str, Any], epochs: int) -> bool:
    """True when the checkpoint's run ended for good: early stopped, or all `epochs` trained and validated."""
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
    loading = {"on_bad_image": _text(data.get("on_bad_image", "error")),
               "max_bad_fraction": data.get("max_bad_fraction", 0.01)}
    train_set = _instantiate(data.train, transform=build_train_transform(size, mean, std, **augment), **loading)
    val_set = _instantiate(data.val, transform=build_eval_transform(size, mean, std), **loading)
    if train_set.class_names != val_set.class_names:
        raise ValueError("train and val splits have different classes: "
                         f"{sorted(set(train_set.class_names) ^ set(val_set.class_names))}")
    partial = data.get("partial") or {}
    if partial.get("keep_ratio", 1.0) < 1.0:
        train_set.labels = hide_labels(train_set.labels, partial.keep_ratio, seed=partial.get("seed", 0))
        log.info("partial labels: kept %.0f%% of each training image's labels (dataset.partial.keep_ratio=%s)",
                 100 * partial.keep_ratio, partial.keep_ratio)
    _validate_data(cfg, train_set, val_set)
    return train_set, val_set


def _instantiate(node: DictConfig, **runtime: Any):
    """instantiate(node, **runtime), raising the target's own error instead of Hydra's wrapper."""
    try:
        return instantiate(node, **runtime)
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, OSError)):
            raise error.__cause__ from None
        raise


def _validate_data(cfg: DictConfig, train_set, val_set) -> None:
    """Check every image file of both splits (dataset.validate: quick, full or off); raise listing all problems.

    With on_bad_image=skip, up to max_bad_fraction of a split may be missing or unreadable (warnings).
    Unknown (-1) training targets are refused with loss=asl, which would read them as probabilities.
    """
    data = cfg.dataset
    unknown = int((train_set.labels == -1).sum())
    if unknown and str(cfg.loss.get("_target_", "")).endswith(".AsymmetricLoss"):
        raise ValueError(f"the training labels hold {unknown} unknown (-1) entries, which loss=asl would read as "
                         "probabilities; use loss=partial_asl or loss=bce (or, for VOC, dataset.difficult=positive)")
    level = _text(data.get("validate", "quick"))
    if level == "off":
        log.warning("dataset.validate=off: image files are not checked before training")
        return
    skip = _text(data.get("on_bad_image", "error")) == "skip"
    report = validate_splits(train_set, val_set, level=level,
                             bad_image_tolerance=data.get("max_bad_fraction", 0.01) if skip else None)
    log.info("data checked (%s, %.1f s): %d train / %d val images, %d classes, no problems", level,
             report.seconds, len(train_set), len(val_set), train_set.num_classes)
    for warning in report.warnings:
        log.warning("data: %s", warning)


def _build_batch_transform(cfg: DictConfig, num_classes: int):
    """MixUp/CutMix for train_one_epoch(batch_transform=...) as augment.mix says, or None."""
    mix = OmegaConf.to_container(cfg.augment, enum_to_str=True).get("mix") or {}
    batch_transform = build_batch_transform(mix, num_classes=num_classes, batch_size=cfg.dataset.batch_size)
    if batch_transform is not None and str(cfg.loss.get("_target_", "")).endswith(".PartialAsymmetricLoss"):
        log.warning("augment.mix makes soft targets, which loss=partial_asl gives no loss; prefer asl or bce")
    return batch_transform


def _text(value: Any) -> str:
    """A config choice as a string: typed configs hold Enum members, plain ones strings."""
    return str(getattr(value, "value", value))


def _build_training_parts(cfg: DictConfig, model: torch.nn.Module, loss: torch.nn.Module,
                          steps_per_epoch: int) -> dict[str, Any]:
    """Optimizer, per-step schedule, grad scaler and weight EMA around `model` and `loss`."""
    steps_per_epoch = min(steps_per_epoch, cfg.trainer.limit_train_batches or steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has fewer images than dataset.batch_size={cfg.dataset.batch_size}")
    optimizer = instantiate(cfg.optimizer)(model)
    scheduler = instantiate(cfg.schedule)(optimizer, total_steps=steps_per_epoch * cfg.trainer.epochs,
                                          steps_per_epoch=steps_per_epoch)
    use_fp16 = cfg.trainer.precision.value == "fp16"
    device_type = next(model.parameters()).device.type
    ema = None
    if cfg.trainer.ema_decay > 0:
        ema = ModelEmaV3(model, decay=cfg.trainer.ema_decay, use_warmup=cfg.trainer.ema_warmup)
    train_model = torch.compile(model) if cfg.trainer.compile else model
    return {
        "model": model,
        "train_model": train_model,
        "loss": loss,
        "optimizer": optimizer,
        "scheduler": scheduler,
        # Only fp16 needs loss scaling; for bf16/fp32 the disabled scaler is a pass-through.
        "scaler": torch.amp.GradScaler(device_type, enabled=use_fp16),
        "ema": ema,
    }


def _summary(history: list[dict], progress: Progress, status: str, wall_time: float) -> dict[str, Any]:
    """metrics.json: status, the best epoch and the last epoch."""
    best = next((r for r in history if r["epoch"] == progress.best_epoch), None)
    final = history[-1] if history else None

    def view(record):
        if record is None:
            return {"epoch": -1, "mAP": float("nan"), "weights": None}
        return {"epoch": record["epoch"], "mAP": record["mAP_best"], "weights": record["eval_weights"],
                "metrics": record}

    return {"status": status, "epochs_run": progress.epoch, "steps": progress.step,
            "wall_time_s": round(wall_time, 1), "best": view(best), "final": view(final)}


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
