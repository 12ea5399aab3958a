"""What the losses share: shape and dtype checks, float32 outside autocast, the asymmetric
log-likelihoods and focusing weight of ASL, and the reductions."""

import torch
from torch import Tensor

from q2l.utils.errors import ConfigError

REDUCTIONS = ("sum", "batchmean", "mean")


def as_float32(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Check that logits and targets are matching (B, K) tensors and return both as float32."""
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(
            f"expected logits and targets of the same shape (B, K), got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    return logits.float(), targets.float()


def autocast_disabled(logits: Tensor) -> torch.autocast:
    """Context that turns off autocast on the logits' device, so the loss ops stay in float32."""
    return torch.autocast(device_type=logits.device.type, enabled=False)


def asymmetric_log_likelihoods(
    logits: Tensor, clip: float, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Float32 logits (B, K) -> p, p_m = max(p - clip, 0), log(max(p, eps)), log(max(1 - p_m, eps)).

    The eps clamp also zeroes the gradient where p < eps (logit below about -18.4), as in ASL's
    reference.
    """
    probs = torch.sigmoid(logits)
    neg_probs = (probs - clip).clamp(min=0.0) if clip > 0 else probs
    log_pos = torch.log(probs.clamp(min=eps))
    log_neg = torch.log((1.0 - neg_probs).clamp(min=eps))
    return probs, neg_probs, log_pos, log_neg


def focusing_weight(base: Tensor, gamma: float | Tensor, eps: float, detach: bool) -> Tensor:
    """Return base ** gamma (elementwise), detached from the graph if `detach` is set."""
    # The clamp keeps the pow gradient finite at base == 0 when 0 < gamma < 1. It does not change
    # the loss:
    # the log term that the weight multiplies is 0 there.
    weight = base.clamp(min=eps).pow(gamma)
    return weight.detach() if detach else weight


def reduce(loss: Tensor, reduction: str) -> Tensor:
    """Elementwise loss (B, K) to a scalar: "sum", "batchmean" (sum / B) or "mean" (sum / (B*K))."""
    if reduction == "sum":
        return loss.sum()
    if reduction == "batchmean":
        return loss.sum() / max(loss.shape[0], 1)
    return loss.sum() / max(loss.numel(), 1)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_clip(clip: float) -> None:
    if not 0.0 <= clip < 1.0:
        raise ConfigError(f"clip must be in [0, 1), got {clip}")


def check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")


def check_num_classes(priors: Tensor, num_classes: int) -> None:
    if priors.numel() != num_classes:
        raise ConfigError(
            f"class_priors has {priors.numel()} classes but the logits have {num_classes}"
        )
