"""From a composed config to the objects a run uses: data sets, model, training state, step options.

Every `_target_` goes through Hydra's `instantiate` (`construct`); config read from a file (a
checkpoint) goes through `instantiate_allowed`, so nothing a file names is imported otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from q2l.config.checks import choice
from q2l.data.device_decode import DeviceAugment, EncodedImages
from q2l.data.mix import build_batch_transform
from q2l.data.partial import hide_labels
from q2l.data.transforms import build_eval_transform, build_train_transform
from q2l.data.validate import validate_splits, without_positives
from q2l.models import MODEL_TARGETS
from q2l.models.backbone import normalization
from q2l.training.engine import StepOptions, TrainState
from q2l.utils import dist
from q2l.utils.errors import InputError

# Messages keep the logger of the command they are part of.
log = logging.getLogger("q2l.train")


def construct(node: Any, **runtime: Any) -> Any:
    """`hydra.utils.instantiate`, raising the target's own error (ValueError, OSError, ...) rather
    than Hydra's wrapper around it, so the user reads which file or value is wrong."""
    try:
        return instantiate(node, **runtime)
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, OSError, RuntimeError)):
            raise error.__cause__ from None
        raise


def instantiate_allowed(node: dict[str, Any], allowed: dict[str, Callable], **runtime: Any) -> Any:
    """`hydra.utils.instantiate` for config read from a file (a checkpoint): every `_target_` in
    `node` must be in `allowed`, so nothing a file names is imported or called otherwise."""
    for target in _targets(node):
        if target not in allowed:
            raise InputError(
                f"the checkpoint's config names {target!r}, which q2l does not rebuild from a "
                f"file; known: {sorted(allowed)}"
            )
    return construct(node, **runtime)


def build_model(
    config: dict[str, Any], num_classes: int, pretrained: bool | None = None, trusted: bool = True
) -> nn.Module:
    """The model `config` (a resolved train config) describes: its backbone under its head.

    Args:
        pretrained: overrides `backbone.pretrained` (False when a checkpoint supplies every weight).
        trusted: False for a checkpoint's config, whose `_target_`s must be in MODEL_TARGETS.
    Returns:
        a module mapping images (B, 3, H, W) to logits (B, K), K = num_classes.
    """
    backbone = {"_target_": "q2l.models.backbone.TimmBackbone", **config["backbone"]}
    if "kwargs" in backbone:  # checkpoints of q2l 0.1
        backbone["timm_kwargs"] = backbone.pop("kwargs")
    backbone.pop("prepare", None)
    if pretrained is not None:
        backbone["pretrained"] = pretrained

    def make(node: dict[str, Any], **runtime: Any) -> Any:
        return (
            construct(node, **runtime)
            if trusted
            else instantiate_allowed(node, MODEL_TARGETS, **runtime)
        )

    head = dict(config["model"])
    if "norm" not in head and head.get("_target_", "").endswith("Query2Label"):
        head["norm"] = "post"  # configs from before the option describe the official layout
    body = make(backbone, image_size=config["dataset"]["image_size"])
    return make(head, backbone=body, num_classes=num_classes)


def _targets(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["_target_"]] if "_target_" in node else []
        return own + [t for value in node.values() for t in _targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in _targets(value)]
    return []


def build_datasets(cfg: DictConfig, mean: tuple[float, ...], std: tuple[float, ...]):
    """Train and val splits with their transforms, normalised as the backbone expects, checked.

    Annotation problems surface here with the format reader's message; dataset.partial then hides
    training labels, and _validate_data checks the files, all before the model is built.
    """
    data = cfg.dataset
    size = data.image_size
    augment = OmegaConf.to_container(cfg.augment, enum_to_str=True)
    augment.pop("mix", None)  # a batch transform, not an image one: _batch_transform
    loading = {
        "on_bad_image": choice(data.on_bad_image),
        "max_bad_fraction": data.max_bad_fraction,
        "max_image_pixels": data.max_image_pixels,
    }
    train_set = construct(
        data.train, transform=build_train_transform(size, mean, std, **augment), **loading
    )
    val_set = construct(data.val, transform=build_eval_transform(size, mean, std), **loading)
    if train_set.class_names != val_set.class_names:
        raise InputError(
            "train and val splits have different classes: "
            f"{sorted(set(train_set.class_names) ^ set(val_set.class_names))}"
        )
    if data.partial.keep_ratio < 1.0:
        train_set.labels = hide_labels(
            train_set.labels, data.partial.keep_ratio, seed=data.partial.seed
        )
        log.info(
            "partial labels: kept %.0f%% of each training image's labels "
            "(dataset.partial.keep_ratio=%s)",
            100 * data.partial.keep_ratio,
            data.partial.keep_ratio,
        )
    dist.on_main(
        _validate_data, cfg, train_set, val_set
    )  # reads every file once, not once per rank
    if choice(data.decode) == "device":
        train_set = EncodedImages(train_set)  # step_options' DeviceAugment decodes the batches
    return train_set, val_set


def _validate_data(cfg: DictConfig, train_set, val_set) -> None:
    """Check both splits' image files (dataset.validate quick/full/off); raise naming every problem.

    With on_bad_image=skip, up to max_bad_fraction of a split may be missing or unreadable
    (warnings). Unknown (-1) training targets are refused with loss=asl, which would read them as
    probabilities. A split without a single positive label is refused whatever dataset.validate
    says: the run would train on nothing, or end with mAP nan and no best.pt.
    """
    data = cfg.dataset
    for name, split in (("train", train_set), ("val", val_set)):
        if len(split) and not (split.labels == 1).any():
            raise InputError(without_positives(name, len(split), int((split.labels == -1).sum())))
    unknown = int((train_set.labels == -1).sum())
    if unknown and str(cfg.loss.get("_target_", "")).endswith(".AsymmetricLoss"):
        raise InputError(
            f"the training labels hold {unknown} unknown (-1) entries, which loss=asl would read "
            "as probabilities; use loss=partial_asl or loss=bce (or, for VOC, "
            "dataset.difficult=positive)"
        )
    level = choice(data.validate)
    if level == "off":
        log.warning("dataset.validate=off: image files are not checked before training")
        return
    skip = choice(data.on_bad_image) == "skip"
    report = validate_splits(
        train_set, val_set, level=level, bad_image_tolerance=data.max_bad_fraction if skip else None
    )
    log.info(
        "data checked (%s, %.1f s): %d train / %d val images, %d classes, no problems",
        level,
        report.seconds,
        len(train_set),
        len(val_set),
        train_set.num_classes,
    )
    for warning in report.warnings:
        log.warning("data: %s", warning)


def _batch_transform(cfg: DictConfig, num_classes: int):
    """MixUp/CutMix as augment.mix says, or None."""
    mix = OmegaConf.to_container(cfg.augment.mix, enum_to_str=True)
    batch_transform = build_batch_transform(
        mix, num_classes=num_classes, batch_size=cfg.dataset.batch_size
    )
    if batch_transform is not None and str(cfg.loss.get("_target_", "")).endswith(
        ".PartialAsymmetricLoss"
    ):
        log.warning(
            "augment.mix makes soft targets, which loss=partial_asl gives no loss: use asl or bce"
        )
    return batch_transform


def build_state(
    cfg: DictConfig, model: torch.nn.Module, loss: torch.nn.Module, num_images: int, precision: str
) -> TrainState:
    """Optimizer, per-step schedule, grad scaler and weight EMA around `model` (on its device);
    under several processes the model is wrapped in DistributedDataParallel for the forward."""
    trainer = cfg.trainer
    # Each rank trains on its share, whole batches only; one step per `accumulate` batches.
    batches = num_images // dist.world_size() // cfg.dataset.batch_size
    if batches == 0:
        raise InputError(
            f"the training split has {num_images} images: fewer than dataset.batch_size="
            f"{cfg.dataset.batch_size} per process ({dist.world_size()} process(es))"
        )
    batches = min(batches, trainer.overfit_batches or trainer.limit_train_batches or batches)
    steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    if trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    if trainer.sync_bn and dist.is_distributed():
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    forward = model
    if dist.is_distributed():
        device = next(model.parameters()).device
        # Wrapping broadcasts rank 0's weights, so every rank (and its EMA) starts from them.
        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = instantiate(cfg.optimizer)(model)
    scheduler = instantiate(cfg.schedule)(
        optimizer, total_steps=steps_per_epoch * trainer.epochs, steps_per_epoch=steps_per_epoch
    )
    ema = None
    if trainer.ema_decay > 0:
        ema = ModelEmaV3(model, decay=trainer.ema_decay, use_warmup=trainer.ema_warmup)
    return TrainState(
        model=model,
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        # Only fp16 needs loss scaling; for bf16/fp32 the disabled scaler is a pass-through.
        scaler=torch.amp.GradScaler(
            next(model.parameters()).device.type, enabled=precision == "fp16"
        ),
        ema=ema,
        forward=torch.compile(forward) if trainer.compile else forward,
    )


def step_options(
    cfg: DictConfig, device: torch.device, precision: str, num_classes: int
) -> StepOptions:
    """How training steps run, as `cfg.trainer` (and `augment`, `dataset.decode`) say."""
    decode = None
    if choice(cfg.dataset.decode) == "device":
        augment = OmegaConf.to_container(cfg.augment, enum_to_str=True)
        augment.pop("mix", None)
        decode = DeviceAugment(
            device,
            cfg.dataset.image_size,
            *normalization(cfg.backbone.name, cfg.backbone.normalization),
            channels_last=cfg.trainer.channels_last,
            **augment,
        )
    return StepOptions(
        device,
        precision=precision,
        channels_last=cfg.trainer.channels_last,
        accumulate=cfg.trainer.accumulate_grad_batches,
        grad_clip_norm=cfg.trainer.grad_clip_norm,
        check_finite=cfg.trainer.check_finite,
        # Collective under DDP, so that every rank stops at the same step.
        is_finite=lambda loss: not dist.any_rank(not bool(torch.isfinite(loss))),
        batch_transform=_batch_transform(cfg, num_classes),
        decode=decode,
    )
