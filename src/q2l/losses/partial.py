"""ASL for partially annotated labels (targets 1 / 0 / -1), after Ben-Baruch et al., CVPR 2022
(arXiv 2110.10955), and the class-priors files its selective mode reads."""

import csv
import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from q2l.losses.common import (
    as_float32,
    asymmetric_log_likelihoods,
    autocast_disabled,
    check_clip,
    check_non_negative,
    check_num_classes,
    check_reduction,
    focusing_weight,
    reduce,
)
from q2l.utils.errors import ConfigError

log = logging.getLogger(__name__)

_PARTIAL_MODES = ("negative", "ignore", "selective")


class PartialAsymmetricLoss(nn.Module):
    """ASL for partially annotated labels: targets 1 (positive), 0 (negative), -1 (not annotated).

    Each entry costs alpha * w * log-likelihood * mode_weight, negated. For positives this is
    alpha_pos * (1 - p)^gamma_pos * log(max(p, eps)). Negatives use alpha_neg and gamma_neg, and
    unannotated entries use alpha_unann and gamma_unann, both with
    p_m^gamma * log(max(1 - p_m, eps)) and p_m = max(p - clip, 0). `mode` decides what happens to
    unannotated entries (mode_weight):

    - "negative": they count as negatives, with their own gamma and alpha (weight 1).
    - "ignore": weight 0.
    - "selective": weight 0 for the `likelihood_topk * B` unannotated entries of the batch with the
      highest logits (the likeliest missed positives). Weight 0 also for every unannotated entry of
      a class whose prior exceeds `prior_threshold`. Other unannotated entries count as negatives.
      As in PartialLabelingCSL, the top-k is taken over all unannotated entries, so it may overlap
      the high-prior classes.

    Class priors are `class_priors`, or read from `class_priors_file`, when given (the paper's
    setting: priors from an earlier run, e.g. PartialLabelingCSL's train_avg_preds.csv).
    Otherwise they are estimated online: in training mode, each forward updates the
    `class_priors` buffer (K,) with an exponential moving average of the batch-mean sigmoid. The
    first batch seeds the average so that it starts unbiased. The buffer is in `state_dict()`, so
    a resumed run keeps it. Early in training the predicted probabilities are high (about 0.5 at a
    neutral initialisation), so the online priors make "selective" ignore most unannotated
    entries until the model settles; a warning says so once (checked on the 1st, 2nd, 4th, 8th,
    ... training batch, one host sync each). In eval mode the buffer is frozen, and if it was
    never filled only the top-k rule applies. Each DDP rank estimates its own priors.

    Entries whose target is none of 1, 0, -1 contribute nothing. They are not checked, because the
    check would cost a device sync per step.

    Args:
        gamma_neg, gamma_pos, gamma_unann: focusing exponents (>= 0).
        alpha_pos, alpha_neg, alpha_unann: per-group loss weights (>= 0).
        clip: probability margin for negatives and unannotated entries, in [0, 1); 0 disables it.
        eps: lower bound inside the logs.
        mode: "negative", "ignore" or "selective".
        likelihood_topk: unannotated entries ignored per sample in "selective" mode (the total is
            topk * B).
        prior_threshold: classes with a prior above this have their unannotated entries ignored in
            "selective" mode; None turns the prior rule off.
        prior_momentum: EMA momentum of the online prior estimate, in [0, 1].
        class_priors: fixed per-class priors (K floats in [0, 1]); None estimates them online.
        class_priors_file: fixed priors from a file (`read_class_priors`: .csv or .json, with or
            without class names); exclusive with `class_priors`. Named classes are put in the
            data set's order by `align_priors`.
        disable_focal_grad: treat the focusing weights as constants in backward.
        reduction: "sum", "batchmean" or "mean". "mean" divides by B*K, ignored entries included.

    Shapes:
        logits: (B, K), any float dtype.
        targets: (B, K) with values in {1, 0, -1}.
        returns: float32 scalar.
    """

    def __init__(
        self,
        gamma_neg: float = 1.0,
        gamma_pos: float = 0.0,
        gamma_unann: float = 2.0,
        alpha_pos: float = 1.0,
        alpha_neg: float = 1.0,
        alpha_unann: float = 1.0,
        clip: float = 0.0,
        eps: float = 1e-8,
        mode: str = "negative",
        likelihood_topk: int = 5,
        prior_threshold: float | None = 0.05,
        prior_momentum: float = 0.99,
        class_priors: list[float] | None = None,
        class_priors_file: str | None = None,
        disable_focal_grad: bool = True,
        reduction: str = "batchmean",
    ) -> None:
        super().__init__()
        self.prior_class_names: list[str] | None = None
        if class_priors_file is not None:
            if class_priors is not None:
                raise ConfigError("give class_priors or class_priors_file, not both")
            self.prior_class_names, class_priors = read_class_priors(class_priors_file)
        check_non_negative(
            gamma_neg=gamma_neg,
            gamma_pos=gamma_pos,
            gamma_unann=gamma_unann,
            alpha_pos=alpha_pos,
            alpha_neg=alpha_neg,
            alpha_unann=alpha_unann,
            likelihood_topk=likelihood_topk,
        )
        check_clip(clip)
        check_reduction(reduction)
        if mode not in _PARTIAL_MODES:
            raise ConfigError(f"mode must be one of {_PARTIAL_MODES}, got {mode!r}")
        if prior_threshold is not None and not 0.0 <= prior_threshold <= 1.0:
            raise ConfigError(f"prior_threshold must be in [0, 1] or None, got {prior_threshold}")
        if not 0.0 <= prior_momentum <= 1.0:
            raise ConfigError(f"prior_momentum must be in [0, 1], got {prior_momentum}")
        self.gamma_neg, self.gamma_pos, self.gamma_unann = gamma_neg, gamma_pos, gamma_unann
        self.alpha_pos, self.alpha_neg, self.alpha_unann = alpha_pos, alpha_neg, alpha_unann
        self.clip = clip
        self.eps = eps
        self.mode = mode
        self.likelihood_topk = int(likelihood_topk)
        self.prior_threshold = prior_threshold
        self.prior_momentum = prior_momentum
        self.disable_focal_grad = disable_focal_grad
        self.reduction = reduction
        self.fixed_priors = class_priors is not None
        if class_priors is None:
            # Empty until the first training batch tells us K; see _load_from_state_dict for
            # resuming.
            priors = torch.empty(0)
        else:
            # float() per item also accepts an OmegaConf ListConfig from Hydra.
            priors = torch.tensor([float(value) for value in class_priors], dtype=torch.float32)
            if priors.ndim != 1 or priors.numel() == 0 or bool(((priors < 0) | (priors > 1)).any()):
                raise ConfigError(
                    f"class_priors must be a non-empty list of floats in [0, 1], got {class_priors}"
                )
        self.register_buffer("class_priors", priors)
        self._training_forwards = 0  # counts training batches, for the online-prior warning
        self._warned_online_priors = False

    def align_priors(self, class_names: list[str]) -> None:
        """Put priors read with class names into `class_names`' order (the data set's); raise
        ValueError naming the classes that differ. Priors without names are left as they are."""
        if self.prior_class_names is None:
            return
        names = list(self.prior_class_names)
        if sorted(names) != sorted(class_names):
            missing = sorted(set(class_names) - set(names))
            extra = sorted(set(names) - set(class_names))
            raise ConfigError(
                f"loss.class_priors_file names other classes than the data set: missing {missing}"
                f", not in the data set {extra}"
            )
        order = torch.tensor([names.index(name) for name in class_names])
        self.class_priors = self.class_priors[order.to(self.class_priors.device)]
        self.prior_class_names = list(class_names)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits, targets = as_float32(logits=logits, targets=targets)  # (B, K) each
        with autocast_disabled(logits):
            probs, neg_probs, log_pos, log_neg = asymmetric_log_likelihoods(
                logits, clip=self.clip, eps=self.eps
            )
            if self.training:
                self._training_forwards += 1
                if not self.fixed_priors:
                    self._update_priors(probs)
            positive, negative, unannotated = (
                targets == 1,
                targets == 0,
                targets == -1,
            )  # (B, K) bool each

            # One pow over the whole batch: each entry picks its group's gamma, alpha, base and log
            # term.
            gamma = (
                positive * self.gamma_pos
                + negative * self.gamma_neg
                + unannotated * self.gamma_unann
            )
            alpha = (
                positive * self.alpha_pos
                + negative * self.alpha_neg
                + unannotated * self.alpha_unann
            )
            base = torch.where(positive, 1.0 - probs, neg_probs)
            log_likelihood = torch.where(positive, log_pos, log_neg)
            weight = focusing_weight(
                base, gamma=gamma, eps=self.eps, detach=self.disable_focal_grad
            )

            loss = -(
                self._mode_weights(logits, unannotated) * alpha * weight * log_likelihood
            )  # (B, K)
            return reduce(loss, reduction=self.reduction)

    def _mode_weights(self, logits: Tensor, unannotated: Tensor) -> Tensor:
        """Per-entry weight (B, K) the mode puts on each entry; annotated entries always get 1."""
        weights = torch.ones_like(logits)
        if self.mode == "negative":
            return weights
        if self.mode == "ignore":
            return weights.masked_fill(unannotated, 0.0)

        num_classes = logits.shape[1]
        with torch.no_grad():
            if self.prior_threshold is not None and self.class_priors.numel() > 0:
                check_num_classes(self.class_priors, num_classes=num_classes)
                high_prior = self.class_priors > self.prior_threshold  # (K,)
                weights = weights.masked_fill(unannotated & high_prior, 0.0)
                self._warn_if_priors_ignore_most(unannotated, high_prior)
            # Rank annotated entries below every unannotated one; taking the top-k and then keeping
            # only the
            # unannotated hits avoids counting the unannotated entries, which would need a device
            # sync.
            scores = logits.masked_fill(~unannotated, float("-inf")).flatten()  # (B*K,)
            num_ignore = min(self.likelihood_topk * logits.shape[0], scores.numel())
            top_indices = scores.topk(num_ignore).indices
            ignore = torch.zeros_like(unannotated).flatten()
            ignore[top_indices] = unannotated.flatten()[top_indices]
            return weights.masked_fill(ignore.view_as(unannotated), 0.0)

    def _warn_if_priors_ignore_most(self, unannotated: Tensor, high_prior: Tensor) -> None:
        """Once per loss: say so when online priors ignore most unannotated entries of a batch.

        Checked on training batches 1, 2, 4, 8, ... only: each check is a host sync.
        """
        count = self._training_forwards
        if self.fixed_priors or self._warned_online_priors or not self.training:
            return
        if count < 1 or count & (count - 1):
            return
        total = float(unannotated.sum())
        ignored = float((unannotated & high_prior).sum())
        if total and ignored / total > 0.5:
            self._warned_online_priors = True
            log.warning(
                "loss.mode=selective with class priors estimated online: %.0f%% of this batch's "
                "unannotated labels belong to classes whose prior exceeds prior_threshold=%s and "
                "are ignored, so selective acts like mode=ignore until the predictions settle. "
                "The paper uses priors from an earlier run: loss.class_priors_file=<.csv|.json> "
                "(e.g. the average predictions of a model trained with mode=negative)",
                100 * ignored / total,
                self.prior_threshold,
            )

    @torch.no_grad()
    def _update_priors(self, probs: Tensor) -> None:
        """Fold the batch-mean probability of each class into the `class_priors` moving average."""
        batch_mean = probs.detach().mean(dim=0)  # (K,)
        if self.class_priors.numel() == 0:
            self.class_priors = batch_mean.clone()
            return
        check_num_classes(self.class_priors, num_classes=batch_mean.numel())
        self.class_priors.mul_(self.prior_momentum).add_(
            batch_mean, alpha=1.0 - self.prior_momentum
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # The online buffer is (0,) until the first batch, so resize it to the saved shape before
        # loading.
        key = prefix + "class_priors"
        if (
            key in state_dict
            and state_dict[key].shape != self.class_priors.shape
            and not self.fixed_priors
        ):
            self.class_priors = torch.empty(
                state_dict[key].shape, dtype=torch.float32, device=self.class_priors.device
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, "
            f"gamma_unann={self.gamma_unann}, alpha_pos={self.alpha_pos}, "
            f"alpha_neg={self.alpha_neg}, alpha_unann={self.alpha_unann}, clip={self.clip}, "
            f"likelihood_topk={self.likelihood_topk}, "
            f"prior_threshold={self.prior_threshold}, fixed_priors={self.fixed_priors}, "
            f"reduction={self.reduction!r}"
        )


def read_class_priors(path: str | Path) -> tuple[list[str] | None, list[float]]:
    """(class names or None, priors) from a .json or .csv file.

    JSON: a list of K numbers, or an object {class name: prior}. CSV: one row per class, either a
    number or `name,number`, optionally under a header; with a header, the priors are the column
    named avg_pred (PartialLabelingCSL's train_avg_preds.csv: Classes,avg_pred) or prior, and the
    names the column named Classes, class or name, when there is one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"loss.class_priors_file not found: {path}")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return [str(name) for name in data], [float(value) for value in data.values()]
            return None, [float(value) for value in data]
        rows = [row for row in csv.reader(path.read_text(encoding="utf-8").splitlines()) if row]
        header = [cell.strip().lower() for cell in rows[0]]
        if not _is_number(rows[0][-1]):
            value_column = next(i for i, cell in enumerate(header) if cell in ("avg_pred", "prior"))
            name_column = next(
                (i for i, cell in enumerate(header) if cell in ("classes", "class", "name")), None
            )
            rows = rows[1:]
        else:
            value_column, name_column = -1, (0 if len(rows[0]) > 1 else None)
        names = None if name_column is None else [row[name_column].strip() for row in rows]
        return names, [float(row[value_column]) for row in rows]
    except (ValueError, StopIteration, IndexError, TypeError, AttributeError) as error:
        raise ConfigError(
            f"loss.class_priors_file={path}: not a list of class priors ({error!r}); see "
            "q2l.losses.read_class_priors for the accepted layouts"
        ) from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
