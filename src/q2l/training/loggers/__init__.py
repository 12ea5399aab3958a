"""Where a run's metrics go besides metrics.jsonl and metrics.json (which are always written):
the `logger` config group, one backend per file, each a `RunLogger` (base.py).

    logger=tensorboard           (default) tensorboard.py: scalars, per-class AP and PR curves,
                                 captioned val images, the HParams view
    logger=csv                   csv_logs.py: epochs.csv, steps.csv, hparams.csv, summary.csv
    logger=mlflow                mlflow.py: an MLflow run in any tracking store (q2l[mlflow])
    logger=wandb                 wandb.py: a Weights & Biases run (q2l[wandb])
    logger=[tensorboard,mlflow]  several at once; logger=none (or logger=[]) for none

conf/logger/<name>.yaml holds each one's `_target_` node under `logger.<name>`; `build_loggers`
builds what the composed config selected, with the run directory. Only rank 0 logs.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import get_class

from q2l.config.checks import ConfigValueError
from q2l.training.loggers.base import RunLogger, RunOutcome
from q2l.training.loggers.hyperparameters import Hyperparameters, run_hyperparameters
from q2l.utils.optional_imports import allow_import

log = logging.getLogger(__name__)

__all__ = [
    "Hyperparameters",
    "RunLogger",
    "RunOutcome",
    "build_loggers",
    "check_packages",
    "run_hyperparameters",
]


def build_loggers(loggers: Mapping[str, Any] | None, run_dir: Path) -> list[RunLogger]:
    """The loggers the `logger` config node selects ({name: `_target_` node}), in its order.
    Building opens nothing: each backend's run starts with `RunLogger.start`."""
    from q2l.training.build import construct  # build imports the model zoo; loggers need not

    built = [construct(node, run_dir=run_dir) for node in _chosen(loggers).values()]
    for name in sorted(set(loggers or {}) - set(_chosen(loggers))):
        # An experiment's settings for a logger that the command line then left out.
        log.warning("logger.%s has settings but logger=%s is not chosen: not used", name, name)
    return built


def check_packages(loggers: Mapping[str, Any] | None) -> None:
    """Raise ConfigValueError naming the pip command when a selected logger's package is not
    installed: checked before a run reads any data, so nothing waits minutes to fail."""
    missing = []
    for name, node in _chosen(loggers).items():
        backend = get_class(node["_target_"])
        package = getattr(backend, "package", None)
        if package:
            allow_import(package)
        if package and importlib.util.find_spec(package) is None:
            missing.append(
                f"logger={name} needs the {package} package, which is not installed: "
                f"pip install 'q2l[{backend.extra}]' (make install installs every logger), or "
                "choose another logger (logger=tensorboard, csv or none)"
            )
    if missing:
        raise ConfigValueError("\n".join(missing))


def _chosen(loggers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The entries of the `logger` node that a chosen option built (they have a `_target_`)."""
    return {name: node for name, node in (loggers or {}).items() if "_target_" in node}
