"""A run's hyperparameters as every logger records them, under the names a user types.

    loss=asl  backbone=resnet50  model=q2l  dataset=coco2014  experiment=coco_r101_448   choices
    optimizer.lr=0.0001  trainer.epochs=80  dataset.batch_size=32  trainer.precision=bf16 ...

The option chosen in each config group comes from Hydra's runtime choices (what the command line
and the experiment picked), not from `_target_` paths; the main keys' values from the resolved
config, with the precision the run actually uses (bf16, fp16 or fp32: never "auto"); and every
other key the command line set (what a sweep varies) with its resolved value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

Value = int | float | str | bool

# The keys that tell runs apart, logged for every run (when the config has them).
MAIN_KEYS = (
    "backbone.name",
    "dataset.image_size",
    "dataset.batch_size",
    "optimizer.lr",
    "optimizer.weight_decay",
    "trainer.epochs",
    "trainer.precision",
    "trainer.accumulate_grad_batches",
    "trainer.ema_decay",
    "trainer.monitor",
    "seed",
)
# Groups and keys that say how a run is watched, launched or continued, not what it computes.
NOT_HYPERPARAMETERS = ("hydra", "logger", "resume", "allow_config_change", "schema")


@dataclass(frozen=True)
class Hyperparameters:
    """choices: {config group: option} (`loss`: "asl"); values: {key: value} (`optimizer.lr`:
    0.0001). Both keyed by what the command line accepts."""

    choices: dict[str, str]
    values: dict[str, Value]

    def flat(self) -> dict[str, Value]:
        """Choices and values in one mapping, choices first."""
        return {**self.choices, **self.values}


def run_hyperparameters(
    config: DictConfig, precision: str, hydra: DictConfig | None = None
) -> Hyperparameters:
    """The hyperparameters of a run with the resolved `config`, run in `precision` (what
    trainer.precision resolved to); `hydra` is the job's Hydra config (HydraConfig), which holds
    the choices and the command line's overrides; without it (a config composed in Python) only
    the keys' values are known."""
    choices = _choices(hydra.runtime.choices) if hydra is not None else {}
    values: dict[str, Value] = {}
    for key in MAIN_KEYS:
        value = OmegaConf.select(config, key, default=None)
        if value is not None:
            values[key] = _value(value)
    values["trainer.precision"] = precision
    overrides = [str(item) for item in hydra.overrides.task] if hydra is not None else []
    for key, value in _overridden(config, overrides, choices).items():
        values.setdefault(key, value)
    return Hyperparameters(choices=choices, values=values)


def _choices(runtime_choices: Mapping[str, Any]) -> dict[str, str]:
    """{group: option} of the groups a run is made of; a list of options (logger=[a,b]) is not
    one option and is left out with the other groups that are not hyperparameters."""
    return {
        group: str(option)
        for group, option in runtime_choices.items()
        if option is not None and group.split("/")[0] not in NOT_HYPERPARAMETERS
    }


def _overridden(
    config: DictConfig, overrides: Sequence[str], choices: Mapping[str, str]
) -> dict[str, Value]:
    """{key: resolved value} of the command line's `key=value` overrides that set a key (group
    choices are in `choices`; deletions `~key` set nothing)."""
    found: dict[str, Value] = {}
    for override in overrides:
        if override.startswith("~") or "=" not in override:
            continue
        key, _, text = override.lstrip("+").partition("=")
        if key in choices or key.split(".")[0].split("/")[0] in NOT_HYPERPARAMETERS:
            continue
        value = OmegaConf.select(config, key, default=None)
        found[key] = _value(value) if value is not None and _scalar(value) else text
    return found


def _scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _value(value: Any) -> Value:
    """A value every backend takes: numbers, booleans and text as they are, the rest as text."""
    return value if _scalar(value) else str(value)
