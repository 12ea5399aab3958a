"""Typed schemas of the commands besides training: eval, predict, export, attention. Each field's
description is what the command's `--help` prints (q2l.cli.help)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from omegaconf import MISSING

from q2l.config.fields import option
from q2l.config.schemas import PathsConf
from q2l.data.dataset import DEFAULT_MAX_IMAGE_PIXELS

_PIXELS = "a larger image (by its header) is skipped unread; null: no limit"


class Calibrate(str, Enum):
    f1 = "f1"  # per class, the threshold of maximum F1 (q2l.evaluation.calibration)


@dataclass
class EvalConf:
    ckpt: str = option(MISSING, "the checkpoint to evaluate (required)")
    dataset: Any = option(None, "a data set (dataset=<option>); default the run's own val split")
    weights: str = option("auto", "auto (what scored best for this checkpoint), raw or ema")
    batch_size: int | None = option(None, "images per batch (null: the run's)")
    num_workers: int | None = option(None, "DataLoader workers (null: the run's)")
    device: str = option("auto", "auto (CUDA when present, else CPU), cpu, cuda, ...")
    precision: str = option(
        "checkpoint", "checkpoint (the run's own, so its mAP is reproduced), auto, fp32, bf16, fp16"
    )
    threshold: float | None = option(None, "threshold of CP/CR/CF1/OP/OR/OF1 (null: the run's)")
    limit_val_batches: int | None = option(None, "evaluate at most n batches")
    output: str | None = option(
        None, "a new folder for the results (default: eval-<ckpt>-<time>/ beside the checkpoint)"
    )
    calibrate: Calibrate | None = option(
        None, "f1: choose per-class thresholds of maximum F1 here, saved beside the checkpoint"
    )
    thresholds_file: str | None = option(
        None, "where calibrate saves (default <ckpt stem>.thresholds.json), or a file to report on"
    )
    save_scores: bool = option(False, "also write scores.npz (ids, classes, scores, targets)")
    progress_bar: bool = option(True, "a progress bar (periodic log lines when not a terminal)")
    paths: PathsConf = option(PathsConf(), "where a data set's label caches are kept")


@dataclass
class PredictConf:
    input: str = option(MISSING, "a folder, a glob, a .txt list of paths, or one image")
    output: str = option(MISSING, "predictions.jsonl or predictions.csv (must not exist)")
    ckpt: str | None = option(None, "a q2l checkpoint, or ...")
    model_file: str | None = option(
        None, "... an export from q2l-export (.onnx, .safetensors, .torchscript.pt); `model=` too"
    )
    weights: str = option("auto", "with ckpt: auto (what scored best), raw or ema")
    thresholds: str = option(
        "auto",
        "auto (calibrated thresholds beside the checkpoint or in the export, else the run's), "
        "run, or a thresholds file",
    )
    batch_size: int = option(32, "images per batch")
    num_workers: int = option(2, "DataLoader workers")
    device: str = option("auto", "auto (CUDA when present, else CPU), cpu, cuda, ...")
    precision: str = option("checkpoint", "checkpoint (the run's own), auto, fp32, bf16, fp16")
    progress_bar: bool = option(True, "a progress bar (periodic log lines when not a terminal)")
    max_image_pixels: int | None = option(DEFAULT_MAX_IMAGE_PIXELS, _PIXELS)


class ExportFormat(str, Enum):
    onnx = "onnx"  # dynamic batch axis, checked under ONNX Runtime; record in metadata_props
    torchscript = "torchscript"  # torch.jit.trace, checked; record as extra file q2l.json
    safetensors = "safetensors"  # weights only, with the record as <output stem>.json


@dataclass
class ExportConf:
    ckpt: str = option(MISSING, "the checkpoint to export (required)")
    format: ExportFormat = option(ExportFormat.onnx, "onnx, torchscript or safetensors")
    output: str | None = option(
        None, "the file (default beside the checkpoint: <stem>.onnx|.torchscript.pt|...)"
    )
    weights: str = option("auto", "auto (what scored best), raw or ema")
    thresholds: str = option(
        "auto", "auto (<ckpt stem>.thresholds.json if present), none, or a thresholds file"
    )
    opset: int | None = option(None, "ONNX opset (null: the exporter's default)")
    tolerance: float = option(1e-4, "largest |score difference| to PyTorch the check accepts")


@dataclass
class AttentionConf:
    ckpt: str = option(MISSING, "the checkpoint (required)")
    image: str = option(MISSING, "the image (required)")
    output: str = option(MISSING, "a new (or empty) folder for the PNGs (required)")
    top_k: int = option(3, "maps for the k highest-scoring labels")
    weights: str = option("auto", "auto (what scored best), raw or ema")
    alpha: float = option(0.5, "opacity of the coloured map over the image")
    device: str = option("auto", "auto (CUDA when present, else CPU), cpu, cuda, ...")
    max_image_pixels: int | None = option(DEFAULT_MAX_IMAGE_PIXELS, _PIXELS)
