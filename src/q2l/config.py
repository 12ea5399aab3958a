"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML option starts from one of these (`defaults: [/schema/<group>/<name>@_here_]`), so a
misspelled key, a value of the wrong type or an unknown option fails at composition with Hydra's
message naming the key. Nodes that build an object (backbone, head, loss, optimizer, schedule)
get their schema from the callable itself (`schema_for`): its keyword arguments, types and
defaults, so each default lives in one place, the code. YAML files only state what differs.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from q2l import losses, optim
from q2l.data.mix import MultiLabelMixup
from q2l.data.transforms import build_train_transform
from q2l.models import HEAD_CLASSES, TimmBackbone
from q2l.rundir import run_time

# conf/ beside src/ in a checkout or editable install; Q2L_CONFIG_DIR points elsewhere.
CONFIG_DIR = os.environ.get("Q2L_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))

# backbone=<option>: short names for common timm models (any other: backbone.name=<timm name>).
BACKBONES = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "tresnet_m": "tresnet_m",
    "tresnet_l": "tresnet_l",
    "tresnet": "tresnet_l",  # the paper's TResNet
    "tresnet_xl": "tresnet_xl",
    "convnext_tiny": "convnext_tiny",
    "swin_large_384": "swin_large_patch4_window12_384",
    # The exact weights of the paper presets (conf/experiment/coco_*.yaml):
    "resnet101_tv": "resnet101.tv_in1k",  # torchvision's ImageNet-1k ResNet-101
    "tresnet_l_448": "tresnet_l.miil_in1k_448",  # Alibaba-MIIL's tresnet_l_448.pth
    "tresnet_l_22k": "tresnet_v2_l.miil_in21k",  # Alibaba-MIIL's tresnet_l_v2_miil_21k.pth
    "swin_large_384_22k": "swin_large_patch4_window12_384.ms_in22k",  # Microsoft's 22k Swin-L
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}


class Precision(str, Enum):
    auto = "auto"  # bf16 where the device has bf16 units, else fp32 (fp16 on older GPUs): q2l.amp
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def schema_for(
    target: Callable,
    runtime: Sequence[str] = (),
    partial: bool = False,
    name: str | None = None,
    with_target: bool = True,
) -> type:
    """A structured-config dataclass with one field per keyword argument of `target`.

    Types and defaults are read from the signature; arguments without a default are MISSING
    (required). `runtime` arguments are supplied when the node is instantiated (the model for an
    optimizer, the backbone for a head) and get no field; `partial` adds `_partial_: true`.
    """
    function = target.__init__ if isinstance(target, type) else target
    hints = typing.get_type_hints(function)
    qualified = f"{target.__module__}.{target.__qualname__}"
    specs: list[tuple] = []
    if with_target:
        specs.append(("_target_", str, field(default=qualified)))
    if partial:
        specs.append(("_partial_", bool, field(default=True)))
    for parameter in inspect.signature(target).parameters.values():
        if parameter.name in runtime or parameter.kind in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        ):
            continue
        default = parameter.default
        if default is inspect.Parameter.empty:
            spec = field(default=MISSING)
        elif isinstance(default, (list, dict, tuple)):
            spec = field(
                default_factory=lambda value=default: (
                    list(value) if isinstance(value, tuple) else value
                )
            )
        else:
            spec = field(default=default)
        specs.append((parameter.name, _config_type(hints.get(parameter.name, Any)), spec))
    name = name or f"{target.__name__[0].upper()}{target.__name__[1:]}Conf"
    schema = dataclasses.make_dataclass(name, specs)
    # Importable as q2l.config.<name>, so a pickled config (submitit ships jobs pickled) refers
    # to this very class in the job's process instead of rebuilding a look-alike.
    schema.__module__ = __name__
    globals()[name] = schema
    return schema


def _config_type(annotation: Any) -> Any:
    """The nearest type OmegaConf validates: sequences become lists, other unions Any."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in arguments if a is not type(None)]
        if len(rest) == 1:
            inner = _config_type(rest[0])
            return Any if inner is Any else typing.Optional[inner]  # noqa: UP045 (OmegaConf needs Optional)
        return Any
    if origin in (list, tuple, Sequence, typing.Sequence) or annotation in (list, tuple):
        item = arguments[0] if arguments else Any
        return list[_config_type(item)] if item in (int, float, str, bool) else list[Any]
    if origin is dict or annotation is dict:
        return dict[str, Any]
    if annotation in (int, float, str, bool) or (
        isinstance(annotation, type) and issubclass(annotation, Enum)
    ):
        return annotation
    return Any


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
    # Share of each training image's known labels kept; the rest become -1 (unknown). 1.0 = off.
    keep_ratio: float = 1.0
    seed: int = 0  # which labels are hidden; independent of the run's seed


@dataclass
class DatasetConf:
    name: str = MISSING
    root: str = MISSING
    image_size: int = 448
    batch_size: int = 32
    num_workers: int = 8  # DataLoader worker processes
    decode: str = "workers"  # training images: "workers" (PIL) or "device" (q2l.data.device_decode)
    train: Any = MISSING  # `_target_` node; the transform is supplied at run time
    val: Any = MISSING
    validate: ValidateLevel = (
        ValidateLevel.quick
    )  # checked at train start (q2l-validate-data does the same)
    on_bad_image: BadImagePolicy = BadImagePolicy.error
    max_bad_fraction: float = (
        0.01  # with on_bad_image=skip: more bad images than this share stops the run
    )
    partial: PartialLabelsConf = field(default_factory=PartialLabelsConf)


@dataclass
class CocoDatasetConf(DatasetConf):
    # The official Q2L keeps val images without annotations (all-negative rows); ASL drops them.
    keep_unannotated: bool = True
    cache_dir: str = "${oc.env:Q2L_CACHE_DIR,${oc.env:HOME,.}/.cache/q2l}"


@dataclass
class VocDatasetConf(DatasetConf):
    # Target of a class present only as objects marked difficult.
    difficult: DifficultPolicy = DifficultPolicy.ignore


@dataclass
class NusWideDatasetConf(DatasetConf):
    csv_file: str = MISSING
    class_file: str | None = None  # None: the sorted labels of the whole CSV
    unknown_labels: UnknownLabelPolicy = UnknownLabelPolicy.error


@dataclass
class OpenImagesDatasetConf(DatasetConf):
    train_annotations: str = MISSING
    val_annotations: str = MISSING
    class_file: str | None = None  # None: every LabelName in both annotation files
    unknown_labels: UnknownLabelPolicy = (
        UnknownLabelPolicy.ignore
    )  # rows of classes outside class_file
    image_extension: str = ".jpg"


@dataclass
class TableDatasetConf(DatasetConf):
    train_file: str = MISSING
    val_file: str | None = None  # None: hold out val_fraction of train_file
    val_fraction: float = 0.1
    split_seed: int = 0
    class_file: str | None = None  # None: the table's own class list or every label it names
    image_column: str = "image"
    labels_column: str = "labels"
    unknown_column: str = "unknown"
    negatives_column: str = "negatives"
    label_delimiter: str = "|"
    unlisted: UnlistedPolicy = UnlistedPolicy.negative  # what a class a row does not mention is
    unknown_labels: UnknownLabelPolicy = UnknownLabelPolicy.error


# Schemas read from the callables they configure (see schema_for): their defaults are the config's.
BackboneConf = schema_for(TimmBackbone, runtime=("image_size",), name="BackboneConf")
MixConf = schema_for(MultiLabelMixup, runtime=("num_classes",), name="MixConf", with_target=False)


@dataclass
class AugmentConf(
    schema_for(build_train_transform, runtime=("image_size", "mean", "std"), with_target=False)
):
    mix: MixConf = field(default_factory=MixConf)  # MixUp/CutMix: a batch transform, off by default


@dataclass
class TrainerConf:
    epochs: int = 40
    precision: Precision = Precision.auto  # the checkpoint records what auto resolved to
    device: str = "auto"  # auto = CUDA when present, else CPU
    grad_clip_norm: float | None = None
    ema_decay: float = 0.9997  # 0 disables the weight EMA
    ema_warmup: bool = False  # timm's warm-up: effective decay ramps up over the first steps
    # The metric that picks best.pt, the weights (raw or EMA) eval.py uses, and early stopping;
    # both are recorded every epoch, and metrics.json names the monitored one.
    monitor: Monitor = Monitor.mAP
    early_stop_patience: int | None = None  # epochs without a better monitored score: stop
    early_stop_rule: EarlyStopRule = EarlyStopRule.best
    threshold: float = 0.5  # for CP/CR/CF1/OP/OR/OF1
    log_every_n_steps: int = 50
    limit_train_batches: int | None = None  # for smoke tests
    limit_val_batches: int | None = None
    channels_last: bool = (
        True  # NHWC convolutions: faster inference on CPU and GPU, neutral in training
    )
    compile: bool = False
    deterministic: bool = False
    progress_bar: bool = True
    # Checkpoints: last.pt every epoch; also every N optimizer steps (mid-epoch) when set, with
    # the newest `keep_last` of those kept as checkpoints/step-N.pt.
    checkpoint_every_steps: int | None = None
    keep_last: int = 2
    # Stop before the optimizer step when the loss or gradient norm is not finite (one host sync
    # per step); under fp16, stop after this many loss-scaler skips in a row.
    check_finite: bool = True
    max_consecutive_skipped_steps: int = 25
    slurm_requeue: bool = True  # on SIGUSR1/SIGTERM under SLURM, save and requeue the job
    # Optimizer step every k batches (the DDP all-reduce too): k x batch_size per process per step.
    accumulate_grad_batches: int = 1
    sync_bn: bool = False  # under DDP, BatchNorm statistics over all processes (SyncBatchNorm)


@dataclass
class TrainConf:
    backbone: BackboneConf = MISSING
    model: Any = MISSING
    dataset: Any = MISSING
    augment: AugmentConf = MISSING
    loss: Any = MISSING
    optimizer: Any = MISSING
    schedule: Any = MISSING
    trainer: TrainerConf = field(default_factory=TrainerConf)
    experiment: Any = None
    # `_target_` nodes run in order before anything is built (the demo generates its data and
    # pretrains its backbone here); a changed entry never blocks a resume.
    prepare: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # "auto": continue from this run directory's newest valid checkpoint, or start fresh when it
    # has none (so a requeued job resumes by itself); a checkpoint path; null: never (a run
    # directory that already holds checkpoints is then refused, never trained over).
    resume: str | None = "auto"
    allow_config_change: bool = False  # resume even though the config differs from the checkpoint's
    init_from: str | None = None  # fine-tune: load only model weights from this checkpoint


class Calibrate(str, Enum):
    f1 = "f1"  # per class, the threshold of maximum F1 (q2l.calibration)


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


# What every head receives when it is built (q2l.build.build_model), so no config field.
HEAD_RUNTIME = ("backbone", "num_classes")


def register_configs() -> None:
    """Put every schema where the YAML files' defaults lists expect it, and the backbone options."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConf)
    store.store(name="eval_schema", node=EvalConf)
    store.store(name="predict_schema", node=PredictConf)
    store.store(name="export_schema", node=ExportConf)
    store.store(name="attention_schema", node=AttentionConf)
    # Every head's schema, named for its file: /schema/model/<module name> (docs/heads.md).
    heads = [
        ("model", head.__module__.rsplit(".", 1)[-1], schema_for(head, runtime=HEAD_RUNTIME))
        for head in HEAD_CLASSES
    ]
    for group, name, node in [
        *heads,
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
        (
            "schedule",
            "onecycle",
            schema_for(
                optim.build_onecycle,
                runtime=("optimizer", "total_steps", "steps_per_epoch"),
                partial=True,
            ),
        ),
        (
            "schedule",
            "cosine",
            schema_for(
                optim.build_cosine,
                runtime=("optimizer", "total_steps", "steps_per_epoch"),
                partial=True,
            ),
        ),
    ]:
        store.store(group=f"schema/{group}", name=name, node=node)
    for option, timm_name in BACKBONES.items():
        # An empty dict rather than None, so `backbone.timm_kwargs={...}` and
        # `+backbone.timm_kwargs.key=value` merge into it from the command line.
        node = BackboneConf(name=timm_name, timm_kwargs={})
        store.store(group="backbone", name=option, node=node)


# Registered on import: anything that composes q2l configs (entry points, tests, notebooks using
# hydra.compose) imports this module first.
register_configs()
OmegaConf.register_new_resolver(
    "q2l_now", lambda pattern: run_time().strftime(pattern), replace=True
)
