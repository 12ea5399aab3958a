"""Asymmetric loss (Ridnik et al., ICCV 2021, arXiv 2009.14119), which Query2Label trains with,
and binary cross-entropy with the same reductions."""

from torch import Tensor, nn
from torch.nn import functional as F

from q2l.losses.common import (
    as_float32,
    asymmetric_log_likelihoods,
    autocast_disabled,
    check_clip,
    check_non_negative,
    check_reduction,
    focusing_weight,
    reduce,
)


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (ASL) on logits.

    With p = sigmoid(x) and the shifted negative probability p_m = max(p - clip, 0), each entry
    costs

        -[y (1 - p)^gamma_pos log(max(p, eps)) + (1 - y) p_m^gamma_neg log(max(1 - p_m, eps))]

    The focusing weights (1 - p)^gamma_pos and p_m^gamma_neg lower the cost of easy entries. The
    clip margin sets the cost of negatives with p <= clip to zero. With both gammas and clip at 0
    this is plain BCE.

    Args:
        gamma_neg: focusing exponent for negatives (>= 0).
        gamma_pos: focusing exponent for positives (>= 0).
        clip: probability margin m subtracted from negatives, in [0, 1); 0 disables it.
        eps: lower bound inside the logs.
        disable_focal_grad: treat the focusing weights as constants in backward, as ASL's reference
            does.
        reduction: "sum", "batchmean" or "mean" (see the module docstring).

    Shapes:
        logits: (B, K), any float dtype.
        targets: (B, K) in [0, 1]; soft targets are allowed. For -1 (unannotated) use
            `PartialAsymmetricLoss`.
        returns: float32 scalar.
    """

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        disable_focal_grad: bool = True,
        reduction: str = "batchmean",
    ) -> None:
        super().__init__()
        check_non_negative(gamma_neg=gamma_neg, gamma_pos=gamma_pos)
        check_clip(clip)
        check_reduction(reduction)
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.eps = eps
        self.disable_focal_grad = disable_focal_grad
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits, targets = as_float32(logits=logits, targets=targets)  # (B, K) each
        with autocast_disabled(logits):
            probs, neg_probs, log_pos, log_neg = asymmetric_log_likelihoods(
                logits, clip=self.clip, eps=self.eps
            )
            weight_pos = focusing_weight(
                1.0 - probs, gamma=self.gamma_pos, eps=self.eps, detach=self.disable_focal_grad
            )
            weight_neg = focusing_weight(
                neg_probs, gamma=self.gamma_neg, eps=self.eps, detach=self.disable_focal_grad
            )
            loss = -(
                targets * weight_pos * log_pos + (1.0 - targets) * weight_neg * log_neg
            )  # (B, K)
            return reduce(loss, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (
            f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, "
            f"eps={self.eps}, disable_focal_grad={self.disable_focal_grad}, "
            f"reduction={self.reduction!r}"
        )


class BCEWithLogitsLoss(nn.Module):
    """Binary cross-entropy on logits, in float32, with the q2l reductions; -1 targets are ignored.

    Unlike `torch.nn.BCEWithLogitsLoss`, the default reduction is "batchmean" (sum over classes,
    mean over the batch), so the value is on the same scale as `AsymmetricLoss`. Entries with target
    -1 get weight 0 ("mean" still divides by B*K), so the baseline also runs on partial labels.

    Args:
        reduction: "sum", "batchmean" (sum over classes, mean over the batch) or "mean".

    Shapes:
        logits: (B, K), any float dtype.
        targets: (B, K) in [0, 1] (soft targets allowed) or -1 for not annotated.
        returns: float32 scalar.
    """

    def __init__(self, reduction: str = "batchmean") -> None:
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits, targets = as_float32(logits=logits, targets=targets)  # (B, K) each
        with autocast_disabled(logits):
            annotated = targets != -1  # (B, K)
            loss = F.binary_cross_entropy_with_logits(
                logits, targets.clamp(min=0.0), reduction="none"
            )
            return reduce(loss * annotated, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
