"""Config values no type can rule out (`trainer.epochs=0`, `dataset.max_bad_fraction=2`,
`optimizer.lr=inf`), checked at the start of every command, before anything is read or written;
and reading a choice's name."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from q2l.utils.errors import ConfigError


def choice(value: Any) -> str:
    """A config choice as a string: typed configs hold Enum members, plain ones strings."""
    return str(getattr(value, "value", value))


class ConfigValueError(ConfigError):
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
    "trainer.save_top_k": _AT_LEAST_1,
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
    "dataset.max_image_pixels": _OPTIONAL_AT_LEAST_1,
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
    "max_image_pixels": _OPTIONAL_AT_LEAST_1,
    "top_k": _AT_LEAST_1,
    "alpha": _FRACTION,
    "tolerance": (lambda v: v > 0, "must be positive"),
}


def check_values(cfg: DictConfig) -> None:
    """Raise ConfigValueError naming every key of `cfg` whose value is an infinite or NaN number
    (wherever it is), or whose value `VALUE_RULES` rejects."""
    non_finite = dict(_non_finite_numbers(cfg))
    problems = [f"{key}={value}: must be a finite number" for key, value in non_finite.items()]
    for key, (accept, why) in VALUE_RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or key in non_finite:
            continue
        if isinstance(value, str) or not accept(value):
            problems.append(f"{key}={value}: {why}")
    if problems:
        raise ConfigValueError("invalid config value(s):\n  " + "\n  ".join(problems))


def _non_finite_numbers(node: Any, name: str = "") -> Iterator[tuple[str, float]]:
    """(key, value) of every float leaf under `node` that is inf, -inf or nan; a list item's key
    ends in `[index]`. Values that cannot be read here (missing, or an interpolation that only
    resolves inside a Hydra run) are not numbers this check could judge, and are passed over."""
    if isinstance(node, DictConfig):
        children = [(f"{name}.{key}" if name else str(key), key) for key in node.keys()]
    elif isinstance(node, ListConfig):
        children = [(f"{name}[{index}]", index) for index in range(len(node))]
    else:
        return
    for child_name, key in children:
        try:
            value = node[key]
        except OmegaConfBaseException:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            yield child_name, value
        else:
            yield from _non_finite_numbers(value, child_name)
