"""MixUp and CutMix for multi-label batches, including targets with unknown (-1) entries.

timm's `Mixup(multi_label=True, label_smoothing=0)` mixes images and dense targets with the same
weight: y = lam·y_i + (1 - lam)·y_j, where j is the mirrored sample (batch.flip(0)); CutMix's
weight is the pasted area. It knows nothing of -1 ("not annotated"): mixed linearly, -1 would
become a meaningless value such as 2·lam - 1. Here an entry is unknown after mixing when it was
unknown in any image that contributes to the mix, and soft (0..1) otherwise.

Use with a loss that accepts soft targets (asl, bce). partial_asl reads targets as exactly 1, 0 or
-1 and would give mixed entries no loss at all.

Randomness comes from NumPy's global generator (timm's choice), which q2l seeds per run and which
data loading never touches (q2l.data.seeding), so mixing is reproducible whatever num_workers.
"""

from __future__ import annotations

import torch
from timm.data.mixup import Mixup

from q2l.utils.errors import ConfigError

MIX_MODES = ("batch", "pair", "elem")


class MultiLabelMixup:
    """(images, targets) -> (mixed images, mixed targets), as a batch transform.

    Shapes: images (B, C, H, W), B even; targets (B, K) of {1, 0, -1} -> (B, K) in [0, 1] or -1.

    Args:
        num_classes: K.
        mixup_alpha, cutmix_alpha: Beta(alpha, alpha) parameters; 0 turns that method off.
        prob: chance that a batch (or pair, or sample) is mixed.
        switch_prob: with both methods on, chance of CutMix instead of MixUp.
        mode: "batch", "pair" or "elem": one weight per batch, pair or sample.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
    ) -> None:
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ConfigError("MixUp/CutMix needs mixup_alpha > 0 or cutmix_alpha > 0")
        if mode not in MIX_MODES:
            raise ConfigError(f"mix mode must be one of {MIX_MODES}, got {mode!r}")
        self.num_classes = num_classes
        # Targets travel with an unknown-indicator block appended, mixed by the same weights.
        self._mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=prob,
            switch_prob=switch_prob,
            mode=mode,
            label_smoothing=0.0,
            num_classes=2 * num_classes,
            multi_label=True,
        )

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) % 2:
            raise ConfigError(
                "MixUp/CutMix pairs each sample with its mirror and needs an even batch, got "
                f"{len(images)}"
            )
        unknown = (targets == -1).float()  # (B, K)
        extended = torch.cat([targets.clamp(min=0), unknown], dim=1)  # (B, 2K)
        images, extended = self._mixup(images, extended)
        mixed, unknown = extended[:, : self.num_classes], extended[:, self.num_classes :]
        return images, torch.where(unknown > 0, torch.full_like(mixed, -1.0), mixed)


def build_batch_transform(mix: dict, num_classes: int, batch_size: int) -> MultiLabelMixup | None:
    """The batch transform `augment.mix` asks for, or None when MixUp and CutMix are both off."""
    if mix.get("mixup_alpha", 0) <= 0 and mix.get("cutmix_alpha", 0) <= 0:
        return None
    if batch_size % 2:
        raise ConfigError(
            "augment.mix needs an even dataset.batch_size (samples are mixed in pairs), got "
            f"{batch_size}"
        )
    mode = str(getattr(mix.get("mode", "batch"), "value", mix.get("mode", "batch")))
    return MultiLabelMixup(
        num_classes=num_classes,
        mixup_alpha=mix.get("mixup_alpha", 0.0),
        cutmix_alpha=mix.get("cutmix_alpha", 0.0),
        prob=mix.get("prob", 1.0),
        switch_prob=mix.get("switch_prob", 0.5),
        mode=mode,
    )
