"""Config values no type can rule out (`trainer.epochs=0`, `dataset.max_bad_fraction=2`), checked
at the start of every command, before anything is read or written; and reading a choice's name."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def choice(value: Any) -> str:
    """A config choice as a string: typed configs hold Enum members, plain ones strings."""
    return str(getattr(value, "value", value))


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
    "trainer.accumulate_grad_batches": _AT_LEAST_1,
    "trainer.early_stop_patience": _OPTIONAL_AT_LEAST_1,
    "trainer.max_consecutive_skipped_steps": _NON_NEGATIVE,
    "trainer.ema_decay": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1) (0 turns the EMA off)"),
    "trainer.grad_clip_norm": (
        lambda v: v is None or v > 0,
        "must be positive (or null for no clipping)",
    ),
    "trainer.threshold": _OPEN_FRACTION,
    "dataset.batch_size": _AT_LEAST_1,
    "dataset.image_size": _AT_LEAST_1,
    "dataset.num_workers": _NON_NEGATIVE,
    "dataset.max_bad_fraction": _FRACTION,
    "dataset.partial.keep_ratio": (
        lambda v: 0.0 < v <= 1.0,
        "must be in (0, 1] (1 keeps every label)",
    ),
    "dataset.val_fraction": _OPEN_FRACTION,
    "optimizer.lr": _NON_NEGATIVE,
    "optimizer.weight_decay": _NON_NEGATIVE,
    "schedule.pct_start": _OPEN_FRACTION,
    "schedule.warmup_epochs": _NON_NEGATIVE,
    # eval.yaml
    "batch_size": (lambda v: v is None or v >= 1, "must be at least 1 (or null for the run's own)"),
    "num_workers": (lambda v: v is None or v >= 0, "must be 0 or more (or null for the run's own)"),
    "limit_val_batches": _OPTIONAL_AT_LEAST_1,
    "threshold": (
        lambda v: v is None or 0.0 < v < 1.0,
        "must be in (0, 1) (or null for the run's own)",
    ),
    # predict.yaml, export.yaml, attention.yaml
    "top_k": _AT_LEAST_1,
    "alpha": _FRACTION,
    "tolerance": (lambda v: v > 0, "must be positive"),
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
