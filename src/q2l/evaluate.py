"""Evaluation entry point: a checkpoint on its run's val split, or on any data set given.

    python eval.py ckpt=outputs/2026-11-22/10-00-00-000000/checkpoints/best.pt
    python eval.py ckpt=... dataset=coco2014 dataset.root=/data/coco

The model is rebuilt from the checkpoint's own config through q2l's allowlists (a `_target_` read
from a file is never imported). Prints overall metrics and per-class AP, and writes eval.json next
to the checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from q2l import dist
from q2l.checkpoint import load_checkpoint
from q2l.config import CONFIG_DIR
from q2l.data import DATASETS, PREPARERS, build_from_checkpoint_config
from q2l.data.loader import build_loader
from q2l.data.transforms import build_eval_transform
from q2l.engine import evaluate
from q2l.metrics import average_precision, compute_metrics
from q2l.models import build_model
from q2l.models.backbone import normalization
from q2l.run_log import write_json

log = logging.getLogger("q2l.eval")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> float:
    result = evaluate_checkpoint(cfg)
    print(format_report(result))
    return result["metrics"]["mAP"]


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt`; returns (and writes) the eval.json content."""
    checkpoint = load_checkpoint(cfg.ckpt)
    run_config = checkpoint["config"]
    class_names = checkpoint["class_names"]
    weights = checkpoint["eval_weights"] if cfg.weights == "auto" else {"raw": "model", "ema": "ema"}.get(cfg.weights)
    if weights is None or checkpoint.get(weights) is None:
        raise ValueError(f"weights={cfg.weights!r}: choose auto, raw or ema (ema only if the run kept one)")
    device = dist.resolve_device(cfg.device)
    dataset_config = OmegaConf.to_container(cfg.dataset, resolve=True) if cfg.dataset else run_config["dataset"]
    image_size = dataset_config["image_size"]

    backbone = {**run_config["backbone"], "pretrained": False}  # the checkpoint holds every weight
    model = build_model(backbone, run_config["model"], len(class_names), image_size)
    model.load_state_dict(checkpoint[weights])
    model.to(device)

    dataset = _build_val_split(cfg, dataset_config, build_eval_transform(image_size, *normalization(backbone["name"])))
    _check_classes(dataset.class_names, class_names, cfg.ckpt)
    loader = build_loader(dataset, cfg.batch_size or dataset_config["batch_size"], train=False,
                          num_workers=dataset_config["num_workers"] if cfg.num_workers is None else cfg.num_workers)
    scores, targets = evaluate(model, loader, device, cfg.precision.value, max_steps=cfg.limit_val_batches,
                               progress=True)
    threshold = cfg.threshold if cfg.threshold is not None else run_config["trainer"]["threshold"]
    per_class = average_precision(scores, targets) * 100
    result = {
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "weights": weights,
        "dataset": dataset_config["name"],
        "num_images": len(targets),
        "threshold": threshold,
        "epoch": checkpoint["epoch"],
        "trained_mAP": checkpoint["metrics"].get("mAP_best"),
        "metrics": compute_metrics(scores, targets, threshold=threshold),
        "per_class_AP": {name: float(ap) for name, ap in zip(class_names, per_class.tolist(), strict=True)},
    }
    output = Path(cfg.output) if cfg.output else Path(cfg.ckpt).with_name("eval.json")
    write_json(output, result)
    log.info("wrote %s", output)
    return result


def _build_val_split(cfg: DictConfig, dataset_config: dict[str, Any], transform):
    """The val split: from the composed config (trusted) or from the checkpoint (allowlisted)."""
    if cfg.dataset:
        if cfg.dataset.get("prepare"):
            instantiate(cfg.dataset.prepare)
        return instantiate(cfg.dataset.val, transform=transform)
    if dataset_config.get("prepare"):
        build_from_checkpoint_config(dataset_config["prepare"], PREPARERS)
    return build_from_checkpoint_config(dataset_config["val"], DATASETS, transform=transform)


def _check_classes(data_classes: list[str], checkpoint_classes: list[str], ckpt: str) -> None:
    if list(data_classes) == list(checkpoint_classes):
        return
    missing = [c for c in checkpoint_classes if c not in data_classes]
    extra = [c for c in data_classes if c not in checkpoint_classes]
    detail = f"only in checkpoint: {missing}; only in data: {extra}" if missing or extra else "same names, other order"
    raise ValueError(f"the data set's classes do not match checkpoint {ckpt} ({detail})")


def format_report(result: dict[str, Any]) -> str:
    """Overall metrics, then per-class AP by class name, as a fixed-width table."""
    metrics = result["metrics"]
    lines = [
        f"checkpoint {result['checkpoint']} ({result['weights']} weights, epoch {result['epoch']})",
        f"data set   {result['dataset']}: {result['num_images']} images, threshold {result['threshold']}",
        "",
        f"{'metric':<12}{'value':>8}",
    ]
    lines += [f"{key:<12}{value:>8.2f}" for key, value in metrics.items() if key != "num_classes_without_positives"]
    if metrics.get("num_classes_without_positives"):
        lines.append(f"({metrics['num_classes_without_positives']} classes without positives left out of mAP)")
    width = max(len(name) for name in result["per_class_AP"]) + 2
    lines += ["", f"{'class':<{width}}{'AP':>8}"]
    lines += [f"{name:<{width}}{ap:>8.2f}" for name, ap in result["per_class_AP"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
