"""Evaluation entry point: a checkpoint on its run's val split, or on any data set given.

    python eval.py ckpt=outputs/2026-11-22/10-00-00-000000/checkpoints/best.pt
    python eval.py ckpt=... dataset=coco2014 dataset.root=/data/coco

The model is rebuilt from the checkpoint's own config through q2l's allowlists (a `_target_` read
from a file is never imported), and no preparation step named there is ever run. Prints overall
metrics and per-class AP, then writes them into a new folder next to the checkpoint
(`eval-<checkpoint>-<time>/eval.json`, or `output=DIR`): an earlier evaluation is never overwritten,
and the metrics are printed even when they cannot be written.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from q2l import dist
from q2l.amp import resolve_precision
from q2l.checkpoint import load_checkpoint, model_from_checkpoint
from q2l.config import CONFIG_DIR, check_values, instantiate_allowed
from q2l.data import DATASETS
from q2l.data.loader import build_loader
from q2l.data.transforms import build_eval_transform
from q2l.engine import StepOptions, evaluate
from q2l.metrics import average_precision, compute_metrics
from q2l.models.backbone import normalization
from q2l.run_log import write_json

log = logging.getLogger("q2l.eval")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> float:
    check_values(cfg)
    output = output_dir(cfg)
    result = evaluate_checkpoint(cfg)
    print(format_report(result), flush=True)
    try:
        write_results(result, output)
    except OSError as error:
        log.error(
            "the metrics above could not be written to %s (%s); pass output=<a writable folder>",
            output,
            error,
        )
        sys.exit(1)
    return result["metrics"]["mAP"]


def output_dir(cfg: DictConfig) -> Path:
    """Where this evaluation's files go: `output`, or a new folder named for checkpoint and time.

    Checked before evaluating: an `output` folder that already holds files is refused (earlier
    results are kept), and an unwritable location is reported at once, as a warning.
    """
    if cfg.output:
        folder = Path(cfg.output).expanduser()
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(
                f"output={cfg.output} already holds files; q2l does not overwrite earlier "
                "results. Pass a new or empty folder"
            )
    else:
        ckpt = Path(cfg.ckpt)
        folder = (
            ckpt.parent
            / f"eval-{ckpt.stem}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}"
        )
    probe = folder if folder.is_dir() else folder.parent
    if not _writable(probe):
        log.warning(
            "%s is not writable: the metrics will be printed but not saved (pass output=DIR)", probe
        )
    return folder


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK)


def write_results(result: dict[str, Any], folder: Path) -> Path:
    """Write eval.json into `folder` (created; must not hold an earlier eval.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "eval.json"
    if path.exists():
        raise FileExistsError(f"{path} exists; q2l does not overwrite earlier results")
    write_json(path, result)
    log.info("wrote %s", path)
    return path


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt`; returns what eval.json holds (nothing is written here)."""
    checkpoint = load_checkpoint(cfg.ckpt)
    run_config = checkpoint["config"]
    class_names = checkpoint["class_names"]
    device = dist.resolve_device(cfg.device)
    dataset_config = (
        OmegaConf.to_container(cfg.dataset, resolve=True) if cfg.dataset else run_config["dataset"]
    )
    image_size = dataset_config["image_size"]
    model, weights = model_from_checkpoint(checkpoint, cfg.weights, image_size)
    # The precision the run trained (and validated) with, so the mAP it recorded is reproduced.
    precision = (
        checkpoint.get("precision", "fp32") if cfg.precision == "checkpoint" else cfg.precision
    )
    channels_last = run_config["trainer"].get("channels_last", False)
    options = StepOptions(
        device, precision=resolve_precision(precision, device), channels_last=channels_last
    )
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)

    transform = build_eval_transform(image_size, *normalization(run_config["backbone"]["name"]))
    dataset = _build_val_split(cfg, dataset_config, transform)
    _check_classes(dataset.class_names, class_names, cfg.ckpt)
    loader = build_loader(
        dataset,
        cfg.batch_size or dataset_config["batch_size"],
        train=False,
        num_workers=dataset_config["num_workers"] if cfg.num_workers is None else cfg.num_workers,
    )
    total = (
        len(loader) if cfg.limit_val_batches is None else min(len(loader), cfg.limit_val_batches)
    )
    batches = tqdm(itertools.islice(loader, total), total=total, leave=False, desc="eval")
    scores, targets = evaluate(model, batches, options)
    threshold = cfg.threshold if cfg.threshold is not None else run_config["trainer"]["threshold"]
    per_class = average_precision(scores, targets) * 100
    return {
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "weights": weights,
        "precision": options.precision,
        "dataset": dataset_config["name"],
        "num_images": len(targets),
        "threshold": threshold,
        "epoch": checkpoint["epoch"],
        "trained_mAP": checkpoint["metrics"].get("mAP_best"),
        "metrics": compute_metrics(scores, targets, threshold=threshold),
        "per_class_AP": {
            name: float(ap) for name, ap in zip(class_names, per_class.tolist(), strict=True)
        },
    }


def _build_val_split(cfg: DictConfig, dataset_config: dict[str, Any], transform):
    """The val split: from the composed config (trusted) or from the checkpoint (allowlisted).

    Evaluation only reads: a data set's `prepare` step (the demo's builder) is never run here, so a
    checkpoint's config cannot make eval write into a folder.
    """
    if cfg.dataset:
        return instantiate(cfg.dataset.val, transform=transform)
    return instantiate_allowed(dataset_config["val"], DATASETS, transform=transform)


def _check_classes(data_classes: list[str], checkpoint_classes: list[str], ckpt: str) -> None:
    if list(data_classes) == list(checkpoint_classes):
        return
    missing = [c for c in checkpoint_classes if c not in data_classes]
    extra = [c for c in data_classes if c not in checkpoint_classes]
    detail = (
        f"only in checkpoint: {missing}; only in data: {extra}"
        if missing or extra
        else "same names, other order"
    )
    raise ValueError(f"the data set's classes do not match checkpoint {ckpt} ({detail})")


def format_report(result: dict[str, Any]) -> str:
    """Overall metrics, then per-class AP by class name, as a fixed-width table."""
    metrics = result["metrics"]
    lines = [
        f"checkpoint {result['checkpoint']} ({result['weights']} weights, epoch {result['epoch']})",
        f"data set   {result['dataset']}: {result['num_images']} images, threshold "
        f"{result['threshold']}",
        "",
        f"{'metric':<12}{'value':>8}",
    ]
    lines += [
        f"{key:<12}{value:>8.2f}"
        for key, value in metrics.items()
        if key != "num_classes_without_positives"
    ]
    if metrics.get("num_classes_without_positives"):
        lines.append(
            f"({metrics['num_classes_without_positives']} classes without positives left out of "
            "mAP)"
        )
    width = max(len(name) for name in result["per_class_AP"]) + 2
    lines += ["", f"{'class':<{width}}{'AP':>8}"]
    lines += [f"{name:<{width}}{ap:>8.2f}" for name, ap in result["per_class_AP"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
