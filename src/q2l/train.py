"""Training entry point: compose the config, build the parts, run the epochs, keep the results.

    python train.py                                  # the demo: Q2L on embedded handwriting data
    python train.py backbone=tresnet_l dataset=coco2014 dataset.root=/data/coco
    python train.py -m loss.gamma_neg=1,2,4          # a sweep, one run directory per job
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3

from q2l import dist
from q2l.checkpoint import link_checkpoint, load_checkpoint, save_checkpoint
from q2l.config import CONFIG_DIR
from q2l.data.loader import build_loader
from q2l.data.transforms import build_eval_transform, build_train_transform
from q2l.engine import evaluate, train_one_epoch
from q2l.metrics import compute_metrics
from q2l.models import build_model
from q2l.models.backbone import normalization
from q2l.run_log import RunLog, write_json

log = logging.getLogger("q2l.train")



@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps
    best_metric: float = float("-inf")
    best_epoch: int = -1


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """Run one training job; returns its best mAP (what sweepers optimise)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = train(cfg, run_dir)
    except Exception as error:
        _record_failure(run_dir, error)
        raise
    return summary["best"]["mAP"]


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train as `cfg` says, writing everything into `run_dir`; returns the metrics.json summary."""
    start = time.perf_counter()
    _check_writable(run_dir)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    dist.seed_everything(cfg.seed, deterministic=cfg.trainer.deterministic)
    device = dist.resolve_device(cfg.trainer.device)
    if cfg.dataset.get("prepare"):
        instantiate(cfg.dataset.prepare)

    train_set, val_set = _build_datasets(cfg, *normalization(cfg.backbone.name))
    model = build_model(config["backbone"], config["model"], train_set.num_classes, cfg.dataset.image_size)
    model.to(device, memory_format=torch.channels_last if cfg.trainer.channels_last else torch.preserve_format)
    train_loader = build_loader(train_set, cfg.dataset.batch_size, True, cfg.dataset.num_workers, cfg.seed,
                                pin_memory=device.type == "cuda")
    val_loader = build_loader(val_set, cfg.dataset.batch_size, False, cfg.dataset.num_workers,
                              pin_memory=device.type == "cuda")
    parts = _build_training_parts(cfg, model, len(train_loader), device)
    progress = Progress()
    history: list[dict[str, Any]] = []
    if cfg.resume:
        progress, history = _resume(cfg.resume, parts, config)
    run_log = RunLog(run_dir, history)
    log.info("run dir %s | %d train / %d val images, %d classes | device %s | %s",
             run_dir, len(train_set), len(val_set), train_set.num_classes, device, cfg.trainer.precision.value)
    try:
        status = _fit(cfg, parts, train_loader, val_loader, progress, run_log, run_dir, train_set.class_names,
                      config, device)
    finally:
        run_log.close()
    summary = _summary(run_log.history, progress, status, time.perf_counter() - start)
    run_log.write_summary(summary)
    best = summary["best"]
    log.info("done (%s): best mAP %.2f at epoch %d (%s weights) in %.0f s; %s", status, best["mAP"],
             best["epoch"], best["weights"], summary["wall_time_s"], run_dir / "checkpoints" / "best.pt")
    return summary


def _build_datasets(cfg: DictConfig, mean: tuple[float, ...], std: tuple[float, ...]):
    """Train and val splits with their transforms, normalised as the backbone expects."""
    size = cfg.dataset.image_size
    augment = OmegaConf.to_container(cfg.augment)
    train_set = instantiate(cfg.dataset.train, transform=build_train_transform(size, mean, std, **augment))
    val_set = instantiate(cfg.dataset.val, transform=build_eval_transform(size, mean, std))
    if train_set.class_names != val_set.class_names:
        raise ValueError("train and val splits have different classes: "
                         f"{sorted(set(train_set.class_names) ^ set(val_set.class_names))}")
    return train_set, val_set


def _build_training_parts(cfg: DictConfig, model: torch.nn.Module, steps_per_epoch: int,
                          device: torch.device) -> dict[str, Any]:
    """Loss, optimizer, per-step schedule, grad scaler and weight EMA."""
    steps_per_epoch = min(steps_per_epoch, cfg.trainer.limit_train_batches or steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has fewer images than dataset.batch_size={cfg.dataset.batch_size}")
    optimizer = instantiate(cfg.optimizer)(model)
    scheduler = instantiate(cfg.schedule)(optimizer, total_steps=steps_per_epoch * cfg.trainer.epochs,
                                          steps_per_epoch=steps_per_epoch)
    use_fp16 = cfg.trainer.precision.value == "fp16"
    ema = None
    if cfg.trainer.ema_decay > 0:
        ema = ModelEmaV3(model, decay=cfg.trainer.ema_decay, use_warmup=cfg.trainer.ema_warmup)
    train_model = torch.compile(model) if cfg.trainer.compile else model
    return {
        "model": model,
        "train_model": train_model,
        "loss": instantiate(cfg.loss).to(device),
        "optimizer": optimizer,
        "scheduler": scheduler,
        # Only fp16 needs loss scaling; for bf16/fp32 the disabled scaler is a pass-through.
        "scaler": torch.amp.GradScaler(device.type, enabled=use_fp16),
        "ema": ema,
    }


def _fit(cfg, parts, train_loader, val_loader, progress: Progress, run_log: RunLog, run_dir: Path,
         class_names: list[str], config: dict, device: torch.device) -> str:
    """The epoch loop: train, evaluate raw and EMA weights, record, checkpoint, stop early."""
    trainer = cfg.trainer
    show_progress = trainer.progress_bar and dist.is_main_process()
    patience = trainer.early_stop_patience
    while progress.epoch < trainer.epochs:
        epoch = progress.epoch
        train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(
            parts["train_model"], train_loader, parts["loss"], parts["optimizer"], parts["scheduler"],
            parts["scaler"], device, trainer.precision.value, ema=parts["ema"],
            grad_clip_norm=trainer.grad_clip_norm, channels_last=trainer.channels_last,
            max_steps=trainer.limit_train_batches, global_step=progress.step, progress=show_progress)
        progress.step += train_stats["steps"]
        progress.epoch += 1
        record, eval_weights = _validate(cfg, parts, val_loader, device, show_progress)
        record = {"epoch": progress.epoch, "step": progress.step,
                  **{f"train_{k}": v for k, v in train_stats.items() if k != "steps"}, **record}
        improved = record["mAP_best"] > progress.best_metric
        if improved:
            progress.best_metric, progress.best_epoch = record["mAP_best"], progress.epoch
        run_log.log_epoch(record, progress.step)
        log.info("epoch %d/%d | loss %.4f | mAP %.2f | mAP(EMA) %s | %.0f img/s", progress.epoch,
                 trainer.epochs, record["train_loss"], record["mAP"],
                 f"{record['mAP_ema']:.2f}" if "mAP_ema" in record else "-", record["train_images_per_sec"])
        _save(run_dir, parts, progress, eval_weights, record, run_log.history, class_names, config, improved)
        if patience is not None and progress.epoch - progress.best_epoch >= patience:
            log.info("early stop: no better mAP for %d epochs", patience)
            return "early_stopped"
    return "completed"


def _validate(cfg, parts, val_loader, device, show_progress) -> tuple[dict[str, Any], str]:
    """Metrics of the raw weights and, with EMA on, of the EMA weights; names the better."""
    trainer = cfg.trainer
    candidates = {"model": parts["model"]}
    if parts["ema"] is not None:
        candidates["ema"] = parts["ema"].module
    record: dict[str, Any] = {}
    for name, module in candidates.items():
        scores, targets = evaluate(module, val_loader, device, trainer.precision.value,
                                   channels_last=trainer.channels_last, max_steps=trainer.limit_val_batches,
                                   progress=show_progress)
        metrics = compute_metrics(scores, targets, threshold=trainer.threshold)
        suffix = "_ema" if name == "ema" else ""
        record.update({f"{key}{suffix}": value for key, value in metrics.items()})
    eval_weights = "ema" if record.get("mAP_ema", float("-inf")) > record["mAP"] else "model"
    record["mAP_best"] = record["mAP_ema" if eval_weights == "ema" else "mAP"]
    record["eval_weights"] = eval_weights
    return record, eval_weights


def _save(run_dir, parts, progress: Progress, eval_weights: str, record: dict, history: list, class_names,
          config: dict, improved: bool) -> None:
    """Write checkpoints/last.pt every epoch; point best.pt at it when the mAP improved."""
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
        "epoch": progress.epoch,
        "step": progress.step,
        "best_metric": progress.best_metric,
        "best_epoch": progress.best_epoch,
        "eval_weights": eval_weights,
        "metrics": record,
        "history": history,
        "class_names": list(class_names),
        "config": config,
    }
    checkpoints = run_dir / "checkpoints"
    save_checkpoint(payload, checkpoints / "last.pt")
    if improved:
        link_checkpoint(checkpoints / "last.pt", checkpoints / "best.pt")


def _resume(path: str, parts: dict[str, Any], config: dict) -> tuple[Progress, list[dict]]:
    """Restore every stateful part from a checkpoint; refuse one from a different model or data."""
    checkpoint = load_checkpoint(path)
    for key in ("backbone", "model", "dataset"):
        if checkpoint["config"].get(key) != config.get(key):
            raise ValueError(f"resume={path}: the checkpoint was trained with a different {key} config:\n"
                             f"  checkpoint: {checkpoint['config'].get(key)}\n  now:        {config.get(key)}")
    parts["model"].load_state_dict(checkpoint["model"])
    if parts["ema"] is not None and checkpoint.get("ema") is not None:
        parts["ema"].module.load_state_dict(checkpoint["ema"])
    for key in ("optimizer", "scheduler", "scaler", "loss"):
        parts[key].load_state_dict(checkpoint[key])
    progress = Progress(checkpoint["epoch"], checkpoint["step"], checkpoint["best_metric"], checkpoint["best_epoch"])
    log.info("resumed from %s at epoch %d, step %d", path, progress.epoch, progress.step)
    return progress, list(checkpoint.get("history", []))


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
    """Leave a metrics.json saying why the run failed (sweep summaries list it), if possible."""
    log.error("run failed: %s: %s", type(error).__name__, error)
    try:
        write_json(run_dir / "metrics.json", {"status": "failed", "error": f"{type(error).__name__}: {error}"})
    except OSError:
        pass  # the run directory itself may be what failed


def _check_writable(run_dir: Path) -> None:
    """Fail before any data is read when the run directory cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"run directory {run_dir} is not writable: {error}") from error


if __name__ == "__main__":
    main()
