"""What a run records, typed: one validated epoch (`EpochRecord`) and the run's summary.

Every epoch is scored with the raw weights and, when the run keeps a weight EMA, with the EMA's
weights: one vocabulary, "raw" and "ema", everywhere (records, metrics.json, checkpoints, eval's
`weights=` option, logs). The better of the two is what best.pt, early stopping and evaluation
use, chosen by the monitored metric (trainer.monitor: mAP or mAP_voc).

On disk an epoch is one flat JSON line of metrics.jsonl (`to_json`, read back by `from_json`):
`train_loss`, `train_lr`, `train_images_per_sec`, `train_bad_images`, every metric of the raw
weights under its own name (`mAP`, `mAP_voc`, `CP`, ...), the EMA's with the suffix `_ema`, the
better of the two for `mAP_best` and `mAP_voc_best`, `eval_weights` ("raw" or "ema") and `monitor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

WEIGHTS = ("raw", "ema")
BEST_OF = ("mAP", "mAP_voc")  # the metrics whose better-of-both is recorded (`<metric>_best`)
_TRAIN = ("train_loss", "train_lr", "train_images_per_sec", "train_bad_images")
_DERIVED = {f"{metric}_best" for metric in BEST_OF} | {"eval_weights", "monitor", "epoch", "step"}


@dataclass
class EpochRecord:
    """One validated epoch.

    raw / ema: the metrics (percent; q2l.metrics.compute_metrics) of the raw weights and of their
    EMA (None without one). train: the epoch's train_loss, train_lr, train_images_per_sec and
    train_bad_images.
    """

    epoch: int
    step: int
    monitor: str
    raw: dict[str, float]
    ema: dict[str, float] | None = None
    train: dict[str, float] = field(default_factory=dict)

    def best(self, metric: str | None = None) -> float:
        """The better of the raw and EMA scores of `metric` (default: the monitored one)."""
        metric = metric or self.monitor
        return self.ema[metric] if self._ema_better(metric) else self.raw[metric]

    @property
    def weights(self) -> str:
        """ "raw" or "ema": the weights that scored better by the monitored metric."""
        return "ema" if self._ema_better(self.monitor) else "raw"

    @property
    def value(self) -> float:
        """The monitored score: what picks best.pt and stops early."""
        return self.best(self.monitor)

    def _ema_better(self, metric: str) -> bool:
        # NaN is never better: a comparison with NaN is false.
        return self.ema is not None and self.ema.get(metric, -math.inf) > self.raw[metric]

    def to_json(self) -> dict[str, Any]:
        """The flat metrics.jsonl line (the module docstring lists its keys)."""
        line: dict[str, Any] = {"epoch": self.epoch, "step": self.step, **self.train, **self.raw}
        if self.ema is not None:
            line.update({f"{key}_ema": value for key, value in self.ema.items()})
        line.update(
            {f"{metric}_best": self.best(metric) for metric in BEST_OF if metric in self.raw}
        )
        line.update(eval_weights=self.weights, monitor=self.monitor)
        return line

    @classmethod
    def from_json(cls, line: dict[str, Any]) -> EpochRecord:
        """Undo `to_json` (also for records written by earlier q2l versions, once the checkpoint
        format upgrade has renamed their keys: q2l.training.checkpoint_format)."""
        train = {key: line[key] for key in _TRAIN if key in line}
        metrics = {k: v for k, v in line.items() if k not in _DERIVED and k not in train}
        ema = {k.removesuffix("_ema"): v for k, v in metrics.items() if k.endswith("_ema")}
        raw = {k: v for k, v in metrics.items() if not k.endswith("_ema")}
        return cls(
            epoch=line["epoch"],
            step=line.get("step", 0),
            monitor=line.get("monitor", "mAP"),
            raw=raw,
            ema=ema or None,
            train=train,
        )


def run_summary(
    history: list[EpochRecord],
    best_epoch: int,
    epochs_run: int,
    steps: int,
    status: str,
    wall_time: float,
    monitor: str,
) -> dict[str, Any]:
    """metrics.json: status, the monitored metric, the best epoch (by it) and the last epoch.

    Each epoch's view holds `value` (the monitored score), `mAP` and `mAP_voc` (each the better of
    raw and EMA), `weights` ("raw" or "ema": the better by the monitored metric) and the record.
    """
    best = next((record for record in history if record.epoch == best_epoch), None)
    return {
        "status": status,
        "monitor": monitor,
        "epochs_run": epochs_run,
        "steps": steps,
        "wall_time_s": round(wall_time, 1),
        "best": _view(best),
        "final": _view(history[-1] if history else None),
    }


def _view(record: EpochRecord | None) -> dict[str, Any]:
    if record is None:
        return {"epoch": -1, "value": float("nan"), "mAP": float("nan"), "weights": None}
    return {
        "epoch": record.epoch,
        "value": record.value,
        "mAP": record.best("mAP"),
        "mAP_voc": record.best("mAP_voc") if "mAP_voc" in record.raw else None,
        "weights": record.weights,
        "metrics": record.to_json(),
    }
