"""What a run records: metrics.jsonl (one line per epoch), metrics.json and TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from q2l.atomic import atomic_write


class RunLog:
    """Append-only metric records in `run_dir`, mirrored to TensorBoard.

    Args:
        run_dir: the run directory; tensorboard/ and the metric files go inside.
        history: epoch records from an earlier run being resumed; rewritten first so the
            resumed run directory holds the whole history.
    """

    def __init__(self, run_dir: str | Path, history: list[dict[str, Any]] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.history: list[dict[str, Any]] = []
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.jsonl.write_text("")
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        for record in history or []:
            self._append(record)

    def log_epoch(self, record: dict[str, Any], step: int) -> None:
        """One epoch's numbers: a metrics.jsonl line and a TensorBoard scalar each."""
        self._append(record)
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                self.writer.add_scalar(_tag(key), value, global_step=step)
        self.writer.flush()

    def log_step(self, step: int, **scalars: float) -> None:
        """Per-step scalars (train loss, lr) to TensorBoard only, under train/step/*."""
        for key, value in scalars.items():
            self.writer.add_scalar(f"train/step/{key}", value, global_step=step)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """metrics.json: final and best results, written atomically."""
        write_json(self.run_dir / "metrics.json", summary)

    def close(self) -> None:
        self.writer.close()

    def _append(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        with self.jsonl.open("a") as handle:
            handle.write(json.dumps(_finite(record)) + "\n")


class NullRunLog:
    """What ranks other than 0 get: the RunLog interface, writing nothing."""

    history: list[dict[str, Any]] = []

    def log_epoch(self, record: dict[str, Any], step: int) -> None:
        pass

    def log_step(self, step: int, **scalars: float) -> None:
        pass

    def write_summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _tag(key: str) -> str:
    """Group TensorBoard scalars: train/*, val/*, val_ema/*."""
    if key.startswith("train_"):
        return f"train/{key.removeprefix('train_')}"
    if key.endswith("_ema"):
        return f"val_ema/{key.removesuffix('_ema')}"
    return f"val/{key}"


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: write null for non-finite floats."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (q2l.atomic), so a reader never sees half a file."""
    with atomic_write(path, "w") as handle:
        json.dump(_finite_nested(data), handle, indent=2)


def _finite_nested(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_nested(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
