"""Typed schemas of the commands besides training: eval, predict, export, attention."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from omegaconf import MISSING

from q2l.data.dataset import DEFAULT_MAX_IMAGE_PIXELS


class Calibrate(str, Enum):
    f1 = "f1"  # per class, the threshold of maximum F1 (q2l.evaluation.calibration)


@dataclass
class EvalConf:
    ckpt: str = MISSING
    dataset: Any = None  # None: the run's own validation split, from the checkpoint
    weights: str = "auto"  # auto: what scored best for this checkpoint; or raw / ema
    batch_size: int | None = None
    num_workers: int | None = None
    device: str = "auto"
    precision: str = (
        "checkpoint"  # the precision the run trained with (so mAP matches); or auto/fp32/bf16/fp16
    )
    threshold: float | None = None  # None: the run's trainer.threshold
    limit_val_batches: int | None = None
    output: str | None = (
        None  # a new folder for eval.json; default: eval-<ckpt>-<time>/ beside the checkpoint
    )
    # f1: choose per-class thresholds of maximum F1 on this split; saved beside the checkpoint as
    # <ckpt stem>.thresholds.json (or thresholds_file), which must not exist yet. Without it, the
    # metrics at the thresholds of that file (or of thresholds_file) are reported too.
    calibrate: Calibrate | None = None
    thresholds_file: str | None = None
    save_scores: bool = False  # scores.npz: image ids, class names, scores, targets
    progress_bar: bool = True  # periodic log lines instead when stderr is not a terminal


@dataclass
class PredictConf:
    input: str = MISSING  # a folder, a glob, a .txt list of paths, or one image
    output: str = MISSING  # predictions.jsonl or predictions.csv; must not exist
    ckpt: str | None = None  # a q2l checkpoint ...
    # ... or an export from q2l-export (.onnx, .safetensors). Not `model=`: that names the config
    # group of model architectures, which Hydra would try to override.
    model_file: str | None = None
    weights: str = "auto"  # with ckpt: auto (what scored best), raw or ema
    # auto: <ckpt stem>.thresholds.json beside the checkpoint, else thresholds embedded in the
    # export, else the run's trainer.threshold; or run; or the path of a thresholds file.
    thresholds: str = "auto"
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"
    precision: str = "checkpoint"  # the run's own (as eval); or auto/fp32/bf16/fp16
    progress_bar: bool = True
    # A larger image (by its header) is skipped unread, as an unreadable one; null: no limit.
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS


class ExportFormat(str, Enum):
    onnx = "onnx"  # dynamic batch axis, checked under ONNX Runtime; record in metadata_props
    torchscript = "torchscript"  # torch.jit.trace, checked; record as extra file q2l.json
    safetensors = "safetensors"  # weights only, with the record as <output stem>.json


@dataclass
class ExportConf:
    ckpt: str = MISSING
    format: ExportFormat = ExportFormat.onnx
    output: str | None = None  # default: beside the checkpoint, <stem>.onnx|.torchscript.pt|...
    weights: str = "auto"
    thresholds: str = "auto"  # auto: <ckpt stem>.thresholds.json if present; none; or a path
    opset: int | None = None  # ONNX opset; None: the exporter's default
    tolerance: float = 1e-4  # largest |score difference| to PyTorch accepted by the check


@dataclass
class AttentionConf:
    ckpt: str = MISSING
    image: str = MISSING
    output: str = MISSING  # a new (or empty) folder for the PNGs
    top_k: int = 3  # maps for the k highest-scoring labels
    weights: str = "auto"
    alpha: float = 0.5  # opacity of the coloured map over the image
    device: str = "auto"
    # A larger image (by its header) is refused unread; null: no limit.
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
