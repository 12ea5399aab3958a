"""Optimizer and learning-rate schedule factories, selected by Hydra `_target_` with `_partial_`.

The composition root supplies what only exists at run time: the model for the optimizer, and the
total number of optimizer steps for the schedules, which are stepped once per iteration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR


def build_adamw(
    model: nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 1e-2,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    no_decay_norm_and_bias: bool = True,
    fused: bool | None = True,
) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters.

    With `no_decay_norm_and_bias`, 1-D parameters (norm scales, biases) and the parameters the
    model's modules declare (`no_weight_decay_names`: a head's label embedding, a ViT's position
    embedding) are put in a group without weight decay.

    Args:
        model: the module whose trainable parameters are optimised (supplied at run time).
        lr: the learning rate (the peak of the schedule).
        weight_decay: weight decay of the parameters that get it.
        betas: Adam's moment coefficients.
        eps: Adam's denominator term.
        no_decay_norm_and_bias: no weight decay on norms, biases and declared parameters.
        fused: torch's fused implementation (None: torch chooses).
    """
    params = _decay_groups(model, weight_decay, no_decay_norm_and_bias)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def build_adam(
    model: nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    no_decay_norm_and_bias: bool = True,
    fused: bool | None = True,
) -> torch.optim.Adam:
    """Adam with L2 weight decay added to the gradients (coupled, unlike AdamW's decoupled decay),
    over `model`'s trainable parameters: how ASL and ML-Decoder train ("true wd" 1e-4 in their
    code: `add_weight_decay` groups, then torch's Adam).

    With `no_decay_norm_and_bias`, 1-D parameters (norm scales, biases) and the parameters the
    model's modules declare (`no_weight_decay_names`) get no weight decay, as ASL's groups leave
    out 1-D parameters and biases.

    Args:
        model: the module whose trainable parameters are optimised (supplied at run time).
        lr: the learning rate (the peak of the schedule).
        weight_decay: weight decay of the parameters that get it.
        betas: Adam's moment coefficients.
        eps: Adam's denominator term.
        no_decay_norm_and_bias: no weight decay on norms, biases and declared parameters.
        fused: torch's fused implementation (None: torch chooses).
    """
    return torch.optim.Adam(
        _decay_groups(model, weight_decay, no_decay_norm_and_bias),
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        fused=fused,
    )


def _decay_groups(
    model: nn.Module, weight_decay: float, no_decay_norm_and_bias: bool
) -> list[dict]:
    """Parameter groups of `model`'s trainable parameters, with or without weight decay."""
    if no_decay_norm_and_bias:
        return param_groups_weight_decay(
            model, weight_decay, no_weight_decay_list=no_weight_decay_names(model)
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": trainable, "weight_decay": weight_decay}]


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters `model`'s modules exclude from weight decay.

    Any module may declare them with a `no_weight_decay()` method returning names relative to
    itself, as timm models do (a ViT: "pos_embed", "cls_token") and q2l heads do (Query2Label:
    "label_embed.weight"); they are returned with the module's prefix in `model`.
    """
    names: set[str] = set()
    for prefix, module in model.named_modules():
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            names |= {f"{prefix}.{name}" if prefix else name for name in declared()}
    return names


def build_onecycle(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    pct_start: float = 0.2,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    cycle_momentum: bool = True,
) -> LRScheduler:
    """OneCycleLR peaking at each group's configured lr, as Query2Label and ASL train.

    Args:
        optimizer, total_steps, steps_per_epoch: supplied at run time.
        pct_start: share of the steps spent rising to the peak.
        div_factor: the start lr is the peak / div_factor.
        final_div_factor: the last lr is the start lr / final_div_factor.
        cycle_momentum: cycle Adam's first beta inversely to the lr.
    """
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=max(total_steps, 2),
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        cycle_momentum=cycle_momentum,
    )


def build_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 1.0,
    warmup_start_factor: float = 0.01,
    min_lr_factor: float = 0.0,
) -> LRScheduler:
    """Linear warm-up from `warmup_start_factor`·lr, then cosine decay to `min_lr_factor`·lr.

    Args:
        optimizer, total_steps, steps_per_epoch: supplied at run time.
        warmup_epochs: epochs of linear warm-up (fractions allowed).
        warmup_start_factor: the warm-up starts at lr x this.
        min_lr_factor: the decay ends at lr x this.
    """
    warmup_steps = min(int(warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_start_factor + (1 - warmup_start_factor) * step / warmup_steps
        progress = min((step - warmup_steps) / decay_steps, 1.0)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return min_lr_factor + (1 - min_lr_factor) * cosine

    return LambdaLR(optimizer, factor)
