"""Evaluation entry point: a checkpoint on its run's val split, or on any data set given.

    python eval.py ckpt=outputs/2026-11-22/10-00-00-000000/checkpoints/best.pt
    python eval.py ckpt=... dataset=coco2014 dataset.root=/data/coco
    python eval.py ckpt=... calibrate=f1 save_scores=true

The model is rebuilt from the checkpoint's own config through q2l's allowlists (a `_target_` read
from a file is never imported), and no preparation step named there is ever run. Prints overall
metrics (at the run's threshold and, when there are per-class thresholds, at those) and a
per-class table, then writes them into a new folder next to the checkpoint
(`eval-<checkpoint>-<time>/`, or `output=DIR`): eval.json, per_class.csv, pr_curves.png and with
save_scores=true scores.npz (q2l.evaluation.reports). An earlier evaluation is never overwritten,
and the metrics are printed even when they cannot be written.

`calibrate=f1` chooses per-class thresholds of maximum F1 on the evaluated split
(q2l.evaluation.calibration) and saves them beside the checkpoint as `<stem>.thresholds.json` (or
`thresholds_file=PATH`), which must not exist yet: checked before evaluating. Without it, an
existing `<stem>.thresholds.json` is reported on as well.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from q2l.config.checks import check_values
from q2l.data import DATASETS
from q2l.data.dataset import DEFAULT_MAX_IMAGE_PIXELS
from q2l.data.loader import build_loader
from q2l.data.transforms import build_eval_transform
from q2l.evaluation import reports
from q2l.evaluation.calibration import f1_thresholds, per_class_counts
from q2l.evaluation.reports import format_report
from q2l.inference.model_info import (
    check_classes,
    read_thresholds,
    thresholds_path,
    write_thresholds,
)
from q2l.inference.runtime import run_settings
from q2l.metrics import average_precision, compute_metrics, threshold_metrics
from q2l.models.backbone import normalization
from q2l.training.build import instantiate_allowed
from q2l.training.checkpoint import load_checkpoint, model_from_checkpoint
from q2l.training.engine import StepOptions, evaluate
from q2l.training.run_log import write_json
from q2l.utils import dist
from q2l.utils.progress import track

log = logging.getLogger("q2l.eval")


def run(cfg: DictConfig) -> float:
    """The whole command on a composed config: evaluate, print, write; returns the mAP."""
    check_values(cfg)
    output = output_dir(cfg)
    destination = thresholds_destination(cfg)
    evaluation = run_evaluation(cfg)
    result = evaluation.result
    print(format_report(result), flush=True)
    try:
        if destination is not None:
            write_thresholds(destination, evaluation.calibration)
        write_results(result, output)
        write_reports(evaluation, output, cfg.save_scores)
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


def thresholds_destination(cfg: DictConfig) -> Path | None:
    """Where calibrate=f1 saves its thresholds (None without calibrate), refused if it exists."""
    if cfg.calibrate is None:
        return None
    path = (
        Path(cfg.thresholds_file).expanduser() if cfg.thresholds_file else thresholds_path(cfg.ckpt)
    )
    if path.exists():
        raise FileExistsError(
            f"{path} exists; q2l does not overwrite thresholds. Delete or move it to recalibrate, "
            "or pass thresholds_file=<a new path>"
        )
    return path


def write_results(result: dict[str, Any], folder: Path) -> Path:
    """Write eval.json into `folder` (created; must not hold an earlier eval.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "eval.json"
    if path.exists():
        raise FileExistsError(f"{path} exists; q2l does not overwrite earlier results")
    write_json(path, result)
    log.info("wrote %s", path)
    return path


def write_reports(evaluation: Evaluation, folder: Path, save_scores: bool) -> None:
    """per_class.csv, pr_curves.png and (save_scores) scores.npz into `folder` (made by
    write_results, so new: nothing earlier is replaced)."""
    result, scores, targets = evaluation.result, evaluation.scores, evaluation.targets
    names = list(result["per_class_AP"])
    ap, counts = evaluation.average_precision, evaluation.counts
    calibrated = None
    if evaluation.thresholds is not None:
        calibrated = (counts["_calibrated"], evaluation.thresholds)
    reports.write_per_class_csv(
        folder / "per_class.csv", names, ap, counts[""], result["threshold"], calibrated
    )
    figure = reports.write_pr_curves(
        folder / "pr_curves.png",
        scores,
        targets,
        names,
        ap,
        result["threshold"],
        evaluation.thresholds,
    )
    plotted = len(figure.panels)
    if plotted < len(names):
        log.info("pr_curves.png shows the first %d of %d classes", plotted, len(names))
    if save_scores:
        reports.write_scores(folder / "scores.npz", evaluation.image_ids, names, scores, targets)
    log.info(
        "wrote per_class.csv, pr_curves.png%s in %s", ", scores.npz" if save_scores else "", folder
    )


@dataclass
class Evaluation:
    """An evaluation's numbers: `result` (eval.json) and what the report files are made from.

    scores, targets: (N, K); average_precision: (K,) per-class AP (fractions); thresholds: (K,)
    per-class thresholds reported on (calibrated now or read from the file beside the
    checkpoint), or None; calibration: the thresholds-file record to save when calibrate=f1 chose
    them; counts: q2l.evaluation.calibration.per_class_counts at the run's threshold (key "") and at
    `thresholds` ("_calibrated"), filled by _add_per_class.
    """

    result: dict[str, Any]
    scores: torch.Tensor
    targets: torch.Tensor
    image_ids: list[str]
    average_precision: torch.Tensor
    thresholds: torch.Tensor | None = None
    calibration: dict[str, Any] | None = None
    counts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt`; returns what eval.json holds (nothing is written here)."""
    return run_evaluation(cfg).result


def run_evaluation(cfg: DictConfig) -> Evaluation:
    """Evaluate `cfg.ckpt` (and calibrate, if asked); nothing is written here."""
    saved_thresholds = _thresholds_to_report(cfg)
    checkpoint = load_checkpoint(cfg.ckpt)
    run_config = checkpoint["config"]
    class_names = checkpoint["class_names"]
    device = dist.resolve_device(cfg.device)
    dataset_config = (
        OmegaConf.to_container(cfg.dataset, resolve=True) if cfg.dataset else run_config["dataset"]
    )
    image_size = dataset_config["image_size"]
    model, weights = model_from_checkpoint(checkpoint, cfg.weights, image_size)
    # precision=checkpoint: the one the run trained (and validated) with, so its mAP is reproduced.
    precision, channels_last = run_settings(cfg.precision, device, checkpoint)
    options = StepOptions(device, precision=precision, channels_last=channels_last)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)

    backbone = run_config["backbone"]
    mean_std = normalization(backbone["name"], backbone.get("normalization", "pretrained"))
    transform = build_eval_transform(image_size, *mean_std)
    dataset = _build_val_split(cfg, dataset_config, transform)
    check_classes(
        dataset.class_names,
        class_names,
        cfg.ckpt,
        mismatch=f"the data set's classes do not match checkpoint {cfg.ckpt}",
        found_in="data",
        expected_in="checkpoint",
    )
    loader = build_loader(
        dataset,
        cfg.batch_size or dataset_config["batch_size"],
        train=False,
        num_workers=dataset_config["num_workers"] if cfg.num_workers is None else cfg.num_workers,
    )
    total = (
        len(loader) if cfg.limit_val_batches is None else min(len(loader), cfg.limit_val_batches)
    )
    batches = track(itertools.islice(loader, total), total, "eval", enabled=cfg.progress_bar)
    scores, targets = evaluate(model, batches, options)
    threshold = cfg.threshold if cfg.threshold is not None else run_config["trainer"]["threshold"]
    ap = average_precision(scores, targets)
    per_class = ap * 100
    result = {
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
            name: float(value) for name, value in zip(class_names, per_class.tolist(), strict=True)
        },
    }
    evaluation = Evaluation(result, scores, targets, list(dataset.image_ids[: len(targets)]), ap)
    if cfg.calibrate is not None:
        split = {"dataset": dataset_config["name"], "num_images": len(targets)}
        _calibrate(evaluation, cfg.ckpt, checkpoint, weights, threshold, split)
    elif saved_thresholds is not None:
        _use_thresholds_file(evaluation, saved_thresholds)
    _add_per_class(evaluation)
    return evaluation


# What calibrate=f1 does, as recorded in the thresholds file and eval.json.
F1_RULE = (
    "per class, the threshold of maximum F1 among the class's annotated scores on the split "
    "(a class is predicted when score >= threshold); ties go to the highest threshold; a class "
    "without annotated positives keeps the run's threshold"
)


def _calibrate(
    evaluation: Evaluation,
    ckpt: str,
    checkpoint: dict[str, Any],
    weights: str,
    threshold: float,
    split: dict[str, Any],
) -> None:
    """Choose per-class F1 thresholds on the evaluated split; keep the record to be saved."""
    names = list(evaluation.result["per_class_AP"])
    chosen = f1_thresholds(evaluation.scores, evaluation.targets, fallback=threshold)
    kept = [name for name, ok in zip(names, chosen.calibrated.tolist(), strict=True) if not ok]
    if kept:
        log.warning("no positives, so the run's threshold is kept for: %s", ", ".join(kept))
    evaluation.calibration = {
        "rule_name": "f1",
        "rule": F1_RULE,
        "fallback": threshold,
        "split": split,
        "checkpoint": str(Path(ckpt).resolve()),
        "checkpoint_epoch": checkpoint.get("epoch"),
        "checkpoint_step": checkpoint.get("step"),
        "weights": weights,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "classes": names,
        "thresholds": chosen.thresholds.tolist(),
        "f1": chosen.f1.tolist(),
        "uncalibrated_classes": kept,
    }
    _report_thresholds(
        evaluation,
        chosen.thresholds,
        "calibrate=f1 on this split (optimistic on it: report on held-out data)",
        F1_RULE,
    )


def _thresholds_to_report(cfg: DictConfig) -> Path | None:
    """Without calibrate: `thresholds_file` (which must exist), else the file beside the
    checkpoint if there is one; their metrics are reported too."""
    if cfg.calibrate is not None:
        return None
    if cfg.thresholds_file:
        path = Path(cfg.thresholds_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"thresholds_file={cfg.thresholds_file}: no such file")
        return path
    beside = thresholds_path(cfg.ckpt)
    return beside if beside.is_file() else None


def _use_thresholds_file(evaluation: Evaluation, path: Path) -> None:
    """Report also at the per-class thresholds saved beside the checkpoint earlier."""
    record = read_thresholds(path)
    check_classes(record["classes"], list(evaluation.result["per_class_AP"]), str(path))
    thresholds = torch.tensor(record["thresholds"], dtype=torch.float64)
    _report_thresholds(evaluation, thresholds, str(path), record.get("rule", "?"))


def _report_thresholds(
    evaluation: Evaluation, thresholds: torch.Tensor, source: str, rule: str
) -> None:
    evaluation.thresholds = thresholds
    metrics = threshold_metrics(evaluation.scores, evaluation.targets, thresholds)
    evaluation.result["calibrated"] = {
        "source": source,
        "rule": rule,
        "metrics": {key: 100.0 * value for key, value in metrics.items()},
        "thresholds": dict(
            zip(evaluation.result["per_class_AP"], thresholds.tolist(), strict=True)
        ),
    }


def _add_per_class(evaluation: Evaluation) -> None:
    """result["per_class"]: positives and precision/recall/F1 (percent) of every class at the
    run's threshold and, with per-class thresholds, at those (suffix _calibrated)."""
    result, scores, targets = evaluation.result, evaluation.scores, evaluation.targets
    tables = {"": per_class_counts(scores, targets, result["threshold"])}
    if evaluation.thresholds is not None:
        tables["_calibrated"] = per_class_counts(scores, targets, evaluation.thresholds)
    evaluation.counts = tables
    per_class = {}
    for k, name in enumerate(result["per_class_AP"]):
        row = {"AP": result["per_class_AP"][name], "positives": int(tables[""]["positives"][k])}
        for suffix, counts in tables.items():
            for key, column in (("precision", "P"), ("recall", "R"), ("f1", "F1")):
                row[f"{column}{suffix}"] = 100.0 * float(counts[key][k])
        per_class[name] = row
    result["per_class"] = per_class


def _build_val_split(cfg: DictConfig, dataset_config: dict[str, Any], transform):
    """The val split: from the composed config (trusted) or from the checkpoint (allowlisted).

    Evaluation only reads: a data set's `prepare` step (the demo's builder) is never run here, so a
    checkpoint's config cannot make eval write into a folder.
    """
    # Runs from before dataset.max_image_pixels get the limit a new run has.
    limit = dataset_config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    if cfg.dataset:
        return instantiate(cfg.dataset.val, transform=transform, max_image_pixels=limit)
    return instantiate_allowed(
        dataset_config["val"], DATASETS, transform=transform, max_image_pixels=limit
    )
