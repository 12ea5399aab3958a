"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML option starts from one of these (`defaults: [/schema/<group>/<name>@_here_]`), so a
misspelled key, a value of the wrong type or an unknown enum value fails at composition time with
Hydra's message naming the key, instead of surfacing hours into a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# conf/ beside src/ in a checkout or editable install; Q2L_CONFIG_DIR points elsewhere.
CONFIG_DIR = os.environ.get("Q2L_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class BackboneConf:
    name: str = MISSING  # any timm model name
    # Query2Label is trained from a pretrained backbone: `weights` (a local file) or timm's offline
    # cache, never a download; missing weights are an error saying how to supply them.
    pretrained: bool = True
    weights: str | None = None  # local .pth / .safetensors
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    prepare: Any = None  # optional `_target_` node run first, e.g. to produce `weights`


@dataclass
class Query2LabelConf:
    _target_: str = "q2l.models.Query2Label"
    hidden_dim: int = 2048
    num_encoder_layers: int = 1
    num_decoder_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 8192
    dropout: float = 0.1
    decoder_self_attention: bool = False
    input_proj: bool = True


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
    num_workers: int = 4
    train: Any = MISSING  # `_target_` node; the transform is supplied at run time
    val: Any = MISSING
    prepare: Any = None  # optional `_target_` node run once before the splits are built
    validate: ValidateLevel = ValidateLevel.quick  # checked at train start (q2l-validate-data does the same)
    on_bad_image: BadImagePolicy = BadImagePolicy.error
    max_bad_fraction: float = 0.01  # with on_bad_image=skip: more bad images than this share stops the run
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
    unknown_labels: UnknownLabelPolicy = UnknownLabelPolicy.ignore  # rows of classes outside class_file
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


class MixMode(str, Enum):
    batch = "batch"  # one mixing weight per batch
    pair = "pair"  # one per pair of samples
    elem = "elem"  # one per sample


class ErasingMode(str, Enum):
    const = "const"  # zeros (the normalised mean)
    rand = "rand"  # one random normal colour per box
    pixel = "pixel"  # random normal noise per pixel


@dataclass
class MixConf:
    # MixUp / CutMix on whole batches, multi-label targets mixed with the same weights.
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) for MixUp; 0 = off
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) for CutMix; 0 = off
    prob: float = 1.0  # chance that a batch is mixed at all
    switch_prob: float = 0.5  # with both on: chance of CutMix instead of MixUp
    mode: MixMode = MixMode.batch


@dataclass
class AugmentConf:
    hflip: float = 0.0  # probability of a horizontal flip
    scale: list[float] | None = None  # RandomResizedCrop area range, e.g. [0.7, 1.0]; None = resize
    randaugment: bool = False  # torchvision RandAugment (the pip `randaugment` the paper used)
    randaugment_num_ops: int = 2
    randaugment_magnitude: int = 9
    cutout_factor: float = 0.0  # side of one square hole as a fraction of the image (ASL: 0.5)
    auto_augment: str | None = None  # timm policy string: rand-m9-mstd0.5-inc1, original, v0, augmix-m5-w3, ...
    random_erasing: float = 0.0  # timm RandomErasing probability, after normalisation
    random_erasing_mode: ErasingMode = ErasingMode.pixel
    random_erasing_count: int = 1  # up to this many erased boxes per image
    mix: MixConf = field(default_factory=MixConf)


@dataclass
class AsymmetricLossConf:
    _target_: str = "q2l.losses.AsymmetricLoss"
    gamma_neg: float = 4.0
    gamma_pos: float = 0.0
    clip: float = 0.05
    eps: float = 1e-8
    disable_focal_grad: bool = True
    reduction: str = "batchmean"


@dataclass
class PartialAsymmetricLossConf:
    _target_: str = "q2l.losses.PartialAsymmetricLoss"
    gamma_neg: float = 1.0
    gamma_pos: float = 0.0
    gamma_unann: float = 2.0
    alpha_pos: float = 1.0
    alpha_neg: float = 1.0
    alpha_unann: float = 1.0
    clip: float = 0.0
    eps: float = 1e-8
    mode: str = "negative"
    likelihood_topk: int = 5
    prior_threshold: float = 0.05
    prior_momentum: float = 0.99
    class_priors: list[float] | None = None
    disable_focal_grad: bool = True
    reduction: str = "batchmean"


@dataclass
class BCELossConf:
    _target_: str = "q2l.losses.BCEWithLogitsLoss"
    reduction: str = "batchmean"


@dataclass
class AdamWConf:
    _target_: str = "q2l.optim.build_adamw"
    _partial_: bool = True
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Norm and bias parameters get no weight decay (the ASL recipe; the official Q2L decays all).
    no_decay_norm_and_bias: bool = True
    fused: bool | None = None  # None: let PyTorch choose (fused on CUDA, foreach elsewhere)


@dataclass
class OneCycleConf:
    _target_: str = "q2l.optim.build_onecycle"
    _partial_: bool = True
    pct_start: float = 0.2
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    cycle_momentum: bool = True


@dataclass
class CosineConf:
    _target_: str = "q2l.optim.build_cosine"
    _partial_: bool = True
    warmup_epochs: float = 1.0
    warmup_start_factor: float = 0.01
    min_lr_factor: float = 0.0


@dataclass
class TrainerConf:
    epochs: int = 40
    precision: Precision = Precision.fp32
    device: str = "auto"  # auto = CUDA when present, else CPU
    grad_clip_norm: float | None = None
    ema_decay: float = 0.9997  # 0 disables the weight EMA
    ema_warmup: bool = False  # timm's warm-up: effective decay ramps up over the first steps
    early_stop_patience: int | None = None  # epochs without a better mAP before stopping
    threshold: float = 0.5  # for CP/CR/CF1/OP/OR/OF1
    log_every_n_steps: int = 50
    limit_train_batches: int | None = None  # for smoke tests
    limit_val_batches: int | None = None
    channels_last: bool = False
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
    slurm_requeue: bool = True  # on SIGUSR1/SIGTERM under SLURM, save and `scontrol requeue`


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
    seed: int = 0
    # "auto": the newest valid checkpoint in this run directory (fresh start if none); or a path.
    resume: str | None = None
    allow_config_change: bool = False  # resume even though the config differs from the checkpoint's
    init_from: str | None = None  # fine-tune: load only model weights from this checkpoint


@dataclass
class EvalConf:
    ckpt: str = MISSING
    dataset: Any = None  # None: the run's own validation split, from the checkpoint
    weights: str = "auto"  # auto: what scored best for this checkpoint; or raw / ema
    batch_size: int | None = None
    num_workers: int | None = None
    device: str = "auto"
    precision: Precision = Precision.fp32
    threshold: float | None = None  # None: the run's trainer.threshold
    limit_val_batches: int | None = None
    output: str | None = None  # a new folder for eval.json; default: eval-<ckpt>-<time>/ beside the checkpoint


class ConfigValueError(ValueError):
    """Config values that cannot work, each named as `key=value: why`."""


# Values a type cannot rule out. Checked by `check_values` at the start of every command, before
# anything is read or written; keys absent from a config (another data set's options) are skipped.
_ABSENT = object()
_AT_LEAST_1 = (lambda v: v >= 1, "must be at least 1")
_OPTIONAL_AT_LEAST_1 = (lambda v: v is None or v >= 1, "must be at least 1 (or null for no limit)")
_FRACTION = (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
_OPEN_FRACTION = (lambda v: 0.0 < v < 1.0, "must be in (0, 1)")
_NON_NEGATIVE = (lambda v: v >= 0, "must be 0 or more")
VALUE_RULES = {
    "trainer.epochs": _AT_LEAST_1,
    "trainer.limit_train_batches": _OPTIONAL_AT_LEAST_1,
    "trainer.limit_val_batches": _OPTIONAL_AT_LEAST_1,
    "trainer.log_every_n_steps": _AT_LEAST_1,
    "trainer.checkpoint_every_steps": _OPTIONAL_AT_LEAST_1,
    "trainer.keep_last": _AT_LEAST_1,
    "trainer.early_stop_patience": _OPTIONAL_AT_LEAST_1,
    "trainer.max_consecutive_skipped_steps": _NON_NEGATIVE,
    "trainer.ema_decay": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1) (0 turns the EMA off)"),
    "trainer.grad_clip_norm": (lambda v: v is None or v > 0, "must be positive (or null for no clipping)"),
    "trainer.threshold": _OPEN_FRACTION,
    "dataset.batch_size": _AT_LEAST_1,
    "dataset.image_size": _AT_LEAST_1,
    "dataset.num_workers": _NON_NEGATIVE,
    "dataset.max_bad_fraction": _FRACTION,
    "dataset.partial.keep_ratio": (lambda v: 0.0 < v <= 1.0, "must be in (0, 1] (1 keeps every label)"),
    "dataset.val_fraction": _OPEN_FRACTION,
    "optimizer.lr": _NON_NEGATIVE,
    "optimizer.weight_decay": _NON_NEGATIVE,
    "schedule.pct_start": _OPEN_FRACTION,
    "schedule.warmup_epochs": _NON_NEGATIVE,
    # eval.yaml
    "batch_size": (lambda v: v is None or v >= 1, "must be at least 1 (or null for the run's own)"),
    "num_workers": (lambda v: v is None or v >= 0, "must be 0 or more (or null for the run's own)"),
    "limit_val_batches": _OPTIONAL_AT_LEAST_1,
    "threshold": (lambda v: v is None or 0.0 < v < 1.0, "must be in (0, 1) (or null for the run's own)"),
}


def check_values(cfg: DictConfig) -> None:
    """Raise ConfigValueError naming every key of `cfg` whose value `VALUE_RULES` rejects."""
    problems = []
    for key, (accept, why) in VALUE_RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if isinstance(value, str) or not accept(value):
            problems.append(f"{key}={value}: {why}")
    if problems:
        raise ConfigValueError("invalid config value(s):\n  " + "\n  ".join(problems))


def register_configs() -> None:
    """Put every schema where the YAML files' defaults lists expect it."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConf)
    store.store(name="eval_schema", node=EvalConf)
    for group, name, node in [
        ("backbone", "timm", BackboneConf),
        ("model", "query2label", Query2LabelConf),
        ("dataset", "coco", CocoDatasetConf),
        ("dataset", "voc", VocDatasetConf),
        ("dataset", "nus_wide", NusWideDatasetConf),
        ("dataset", "openimages", OpenImagesDatasetConf),
        ("dataset", "table", TableDatasetConf),
        ("augment", "augment", AugmentConf),
        ("loss", "asl", AsymmetricLossConf),
        ("loss", "partial_asl", PartialAsymmetricLossConf),
        ("loss", "bce", BCELossConf),
        ("optimizer", "adamw", AdamWConf),
        ("schedule", "onecycle", OneCycleConf),
        ("schedule", "cosine", CosineConf),
    ]:
        store.store(group=f"schema/{group}", name=name, node=node)


# Registered on import: anything that composes q2l configs (entry points, tests, notebooks using
# hydra.compose) imports this module first.
register_configs()
