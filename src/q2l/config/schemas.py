"""Typed schemas for every config group of training, registered in Hydra's ConfigStore
(q2l.config.register_configs).

Each YAML option starts from one of these (`defaults: [/schema/<group>/<name>@_here_]`), so a
misspelled key, a value of the wrong type or an unknown option fails at composition with Hydra's
message naming the key. Nodes that build an object (backbone, head, loss, optimizer, schedule)
get their schema from the callable itself (`schema_for`): its keyword arguments, types and
defaults, so each default lives in one place, the code. YAML files only state what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from omegaconf import MISSING

from q2l import losses, optim
from q2l.config.fields import option, schema_for
from q2l.data.dataset import DEFAULT_MAX_IMAGE_PIXELS
from q2l.data.mix import MultiLabelMixup
from q2l.data.transforms import build_train_transform
from q2l.models import HEAD_CLASSES, TimmBackbone
from q2l.training.loggers.csv_logs import CSVLogger
from q2l.training.loggers.mlflow import MLflowLogger
from q2l.training.loggers.tensorboard import TensorBoardLogger
from q2l.training.loggers.wandb import WandbLogger


class Precision(str, Enum):
    # auto: bf16 where the device has bf16 units, else fp32 (fp16 on older GPUs): q2l.utils.amp
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Monitor(str, Enum):
    mAP = "mAP"  # non-interpolated AP (sklearn, ASL, ML-Decoder)
    mAP_voc = "mAP_voc"  # VOC all-point interpolated AP (the official Query2Label's and paper's)


class EarlyStopRule(str, Enum):
    best = "best"  # stop when the monitored best is early_stop_patience epochs old
    # main_mlc.py's: more than early_stop_patience epochs since the later of the best epoch and
    # the regular (non-EMA) model's best epoch, and the last EMA score below the best EMA score
    official = "official"


class ValidateLevel(str, Enum):
    quick = "quick"  # open every image file and check its header
    full = "full"  # decode every image completely
    off = "off"


class DecodePlace(str, Enum):
    workers = "workers"  # DataLoader workers decode and augment each image (PIL)
    device = "device"  # workers read files; the step decodes and augments on the device (nvJPEG)


class BadImagePolicy(str, Enum):
    error = "error"  # stop, naming the file and the decoder's reason
    skip = "skip"  # log it once, use the next readable sample, stop above max_bad_fraction


class DifficultPolicy(str, Enum):
    ignore = "ignore"  # -1: neither positive nor negative
    positive = "positive"
    negative = "negative"


class UnknownLabelPolicy(str, Enum):
    error = "error"
    ignore = "ignore"


class UnlistedPolicy(str, Enum):
    negative = "negative"
    unknown = "unknown"


@dataclass
class PartialLabelsConf:
    keep_ratio: float = option(
        1.0, "share of each training image's known labels kept, the rest hidden (-1); 1: off"
    )
    seed: int = option(0, "which labels are hidden (independent of the run's seed)")


@dataclass
class DatasetConf:
    name: str = option(MISSING, "the data set's name (set by each dataset= option)")
    root: str = option(MISSING, "the data set's folder (required for every real data set)")
    image_size: int = option(448, "images are resized to image_size x image_size")
    batch_size: int = option(32, "images per batch, per process")
    num_workers: int = option(8, "DataLoader worker processes (at most the usable CPUs)")
    decode: DecodePlace = option(
        DecodePlace.workers,
        "training images decoded and augmented by: workers (PIL, CPU) or device (the training "
        "device, nvJPEG on CUDA; no auto_augment or random_erasing)",
    )
    train: Any = option(MISSING, "the training split: a `_target_` node (format reader)")
    val: Any = option(MISSING, "the validation split: a `_target_` node")
    validate: ValidateLevel = option(
        ValidateLevel.quick, "file check at train start: quick (headers), full (decode), off"
    )
    on_bad_image: BadImagePolicy = option(
        BadImagePolicy.error, "an unreadable image: error (stop, naming it) or skip"
    )
    max_bad_fraction: float = option(
        0.01, "with on_bad_image=skip: more bad images than this share stops the run"
    )
    max_image_pixels: int | None = option(
        DEFAULT_MAX_IMAGE_PIXELS,
        "an image declaring more pixels is a bad image, refused unread (null: no limit)",
    )
    partial: PartialLabelsConf = option(PartialLabelsConf(), "simulated partial labels")


@dataclass
class CocoDatasetConf(DatasetConf):
    keep_unannotated: bool = option(
        True, "keep images without annotations as all-negative rows (official Q2L; ASL drops)"
    )
    cache_dir: str = option("${paths.cache_dir}", "where label caches are kept")


@dataclass
class VocDatasetConf(DatasetConf):
    difficult: DifficultPolicy = option(
        DifficultPolicy.ignore,
        "a class present only as difficult objects: ignore (-1), positive or negative",
    )


@dataclass
class NusWideDatasetConf(DatasetConf):
    csv_file: str = option(MISSING, "the NUS-WIDE CSV (image, labels, split)")
    class_file: str | None = option(None, "class names, one per line (null: the CSV's labels)")
    unknown_labels: UnknownLabelPolicy = option(
        UnknownLabelPolicy.error, "a label outside class_file: error or ignore"
    )


@dataclass
class OpenImagesDatasetConf(DatasetConf):
    train_annotations: str = option(MISSING, "human-verified labels CSV of the training split")
    val_annotations: str = option(MISSING, "human-verified labels CSV of the validation split")
    class_file: str | None = option(None, "class list (null: every LabelName in both files)")
    unknown_labels: UnknownLabelPolicy = option(
        UnknownLabelPolicy.ignore, "rows of classes outside class_file: ignore or error"
    )
    image_extension: str = option(".jpg", "image file name = ImageID + this")


@dataclass
class TableDatasetConf(DatasetConf):
    train_file: str = option(MISSING, "CSV/TSV/JSON/JSONL table of images and labels")
    val_file: str | None = option(None, "the val table (null: hold out val_fraction of train)")
    val_fraction: float = option(0.1, "share of train_file held out when val_file is null")
    split_seed: int = option(0, "which images are held out")
    class_file: str | None = option(
        None, "class names, one per line (null: the table's own or every label it names)"
    )
    image_column: str = option("image", "column (or key) of the image file name")
    labels_column: str = option("labels", "column of the positive labels")
    unknown_column: str = option("unknown", "column of the labels known to be unknown (-1)")
    negatives_column: str = option("negatives", "column of the labels known to be absent")
    label_delimiter: str = option("|", "separates labels inside one cell")
    unlisted: UnlistedPolicy = option(
        UnlistedPolicy.negative, "a class a row does not mention: negative (0) or unknown (-1)"
    )
    unknown_labels: UnknownLabelPolicy = option(
        UnknownLabelPolicy.error, "a label outside class_file: error or ignore"
    )


# Schemas read from the callables they configure (see schema_for): their defaults are the config's.
BackboneConf = schema_for(TimmBackbone, runtime=("image_size",), name="BackboneConf")
MixConf = schema_for(MultiLabelMixup, runtime=("num_classes",), name="MixConf", with_target=False)


@dataclass
class AugmentConf(
    schema_for(build_train_transform, runtime=("image_size", "mean", "std"), with_target=False)
):
    mix: MixConf = option(MixConf(), "MixUp/CutMix, a batch transform (off by default)")


@dataclass
class TrainerConf:
    epochs: int = option(40, "epochs to train")
    precision: Precision = option(
        Precision.auto, "autocast: auto (bf16 where the device computes it fast), fp32, bf16, fp16"
    )
    device: str = option("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...")
    grad_clip_norm: float | None = option(None, "clip the gradient norm to this (null: never)")
    ema_decay: float = option(0.9997, "decay of the weight EMA (0: no EMA)")
    ema_warmup: bool = option(False, "timm's EMA warm-up: the decay ramps up over first steps")
    monitor: Monitor = option(
        Monitor.mAP, "the metric that picks best.pt, the weights eval uses and early stopping"
    )
    early_stop_patience: int | None = option(
        None, "stop after this many epochs without a better monitored score (null: never)"
    )
    early_stop_rule: EarlyStopRule = option(
        EarlyStopRule.best, "best (the best is patience epochs old) or official (main_mlc.py's)"
    )
    threshold: float = option(0.5, "score threshold of CP/CR/CF1/OP/OR/OF1")
    log_every_n_steps: int = option(50, "train loss and lr to the logs every n steps")
    limit_train_batches: int | None = option(None, "train on at most n batches per epoch")
    limit_val_batches: int | None = option(None, "validate on at most n batches")
    overfit_batches: int | None = option(
        None, "train on the same first n batches every epoch (a debugging check, debug=overfit)"
    )
    channels_last: bool = option(True, "NHWC convolutions (faster on CPU and GPU)")
    compile: bool = option(False, "torch.compile the training forward")
    deterministic: bool = option(False, "deterministic kernels (bitwise repeatable, slower)")
    progress_bar: bool = option(True, "a progress bar (periodic log lines when not a terminal)")
    checkpoint_every_steps: int | None = option(
        None, "also save every n optimizer steps (mid-epoch), as checkpoints/step-N.pt"
    )
    keep_last: int = option(2, "how many step-N.pt checkpoints are kept")
    save_top_k: int = option(
        1, "with k > 1, also keep the k best epochs as top-<score>-epoch<N>.pt (weights only)"
    )
    check_finite: bool = option(
        True, "stop before the optimizer step when the loss or gradient is not finite"
    )
    max_consecutive_skipped_steps: int = option(
        25, "under fp16: stop after this many loss-scaler skips in a row"
    )
    slurm_requeue: bool = option(True, "under SLURM: requeue the job after a stop signal")
    accumulate_grad_batches: int = option(1, "one optimizer step every k batches")
    sync_bn: bool = option(False, "under DDP: BatchNorm statistics over all processes")


@dataclass
class PathsConf:
    data_dir: str = option("data", "the demo's generated data (and a home for data sets)")
    output_dir: str = option("outputs", "run and sweep directories")
    cache_dir: str = option("~/.cache/q2l", "label caches")


@dataclass
class TrainConf:
    backbone: BackboneConf = option(MISSING, "the backbone (backbone=<option>)")
    model: Any = option(MISSING, "the head (model=<option>)")
    dataset: Any = option(MISSING, "the data set (dataset=<option>): required")
    augment: AugmentConf = option(MISSING, "training augmentation (augment=<option>)")
    loss: Any = option(MISSING, "the loss (loss=<option>)")
    optimizer: Any = option(MISSING, "the optimizer (optimizer=<option>)")
    schedule: Any = option(MISSING, "the learning-rate schedule (schedule=<option>)")
    logger: dict[str, Any] = option(
        {},
        "where metrics go besides metrics.jsonl: logger=tensorboard, csv, mlflow, wandb, several "
        "(logger=[tensorboard,mlflow]) or none",
    )
    trainer: TrainerConf = option(TrainerConf(), "how training runs")
    paths: PathsConf = option(PathsConf(), "where q2l reads and writes (paths=<option>)")
    experiment: Any = option(None, "a preset of overrides (experiment=<option>)")
    prepare: dict[str, Any] = option(
        {}, "`_target_` steps run before anything is built (the demo's data and backbone)"
    )
    seed: int = option(0, "seeds data order, augmentation and initialisation")
    resume: str | None = option(
        "auto",
        "auto: continue this run directory's newest checkpoint (or start fresh); a checkpoint "
        "path; null: never",
    )
    allow_config_change: bool = option(
        False, "resume even though the config differs from the checkpoint's"
    )
    init_from: str | None = option(
        None, "fine-tune: load only the model weights (matching names and shapes) of a checkpoint"
    )


# What every head receives when it is built (q2l.training.build.build_model), so no config field.
HEAD_RUNTIME = ("backbone", "num_classes")


def group_schemas() -> list[tuple[str, str, type]]:
    """(group, name, schema) of every schema a YAML option starts from, stored by
    q2l.config.register_configs as /schema/<group>/<name>."""
    # Every head's schema, named for its file: /schema/model/<module name> (docs/heads.md).
    heads = [
        ("model", head.__module__.rsplit(".", 1)[-1], schema_for(head, runtime=HEAD_RUNTIME))
        for head in HEAD_CLASSES
    ]
    schedule_runtime = ("optimizer", "total_steps", "steps_per_epoch")
    return [
        *heads,
        # An empty timm_kwargs dict rather than None, so `backbone.timm_kwargs={...}` and
        # `+backbone.timm_kwargs.key=value` merge into it from the command line.
        ("backbone", "timm", BackboneConf(timm_kwargs={})),
        ("dataset", "coco", CocoDatasetConf),
        ("dataset", "voc", VocDatasetConf),
        ("dataset", "nus_wide", NusWideDatasetConf),
        ("dataset", "openimages", OpenImagesDatasetConf),
        ("dataset", "table", TableDatasetConf),
        ("augment", "augment", AugmentConf),
        ("loss", "asl", schema_for(losses.AsymmetricLoss)),
        ("loss", "partial_asl", schema_for(losses.PartialAsymmetricLoss)),
        ("loss", "bce", schema_for(losses.BCEWithLogitsLoss)),
        ("optimizer", "adamw", schema_for(optim.build_adamw, runtime=("model",), partial=True)),
        ("optimizer", "adam", schema_for(optim.build_adam, runtime=("model",), partial=True)),
        (
            "schedule",
            "onecycle",
            schema_for(optim.build_onecycle, runtime=schedule_runtime, partial=True),
        ),
        (
            "schedule",
            "cosine",
            schema_for(optim.build_cosine, runtime=schedule_runtime, partial=True),
        ),
        *[
            ("logger", backend.name, schema_for(backend, runtime=("run_dir",)))
            for backend in (TensorBoardLogger, CSVLogger, MLflowLogger, WandbLogger)
        ],
    ]
