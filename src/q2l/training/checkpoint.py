"""One checkpoint schema: written atomically, read back safely, restored into a TrainState.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so it loads with
`torch.load(weights_only=True)`: nothing in it is pickled code, and the config it carries is a
plain container that is only rebuilt through allowlists (q2l.training.build.instantiate_allowed).

Keys: format_version (q2l.training.checkpoint_format, which upgrades older files on load),
q2l_version, torch_version; the TrainState (model: the raw weights, ema, optimizer, scheduler,
scaler, loss, step, rng: one entry per process); progress (the loop's position: LoopState),
epoch, best_metric, best_epoch, eval_weights ("raw" or "ema": the better on the epoch), metrics
(the last epoch's record), history (every epoch's), class_names, config, precision (the resolved
autocast precision, which evaluation reuses), world_size.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

import q2l
from q2l.models.weights import WeightsFileError, load_torch_file
from q2l.training.checkpoint_format import FORMAT_VERSION, upgrade
from q2l.training.engine import TrainState
from q2l.utils.atomic import atomic_write
from q2l.utils.errors import InputError, UserError
from q2l.utils.messages import and_more

PERIODIC_PATTERN = re.compile(r"^step-(\d+)\.pt$")

log = logging.getLogger(__name__)


# The state-dict entry of each kind of weights ("raw" weights are the model's own).
_STATE_KEYS = {"raw": "model", "ema": "ema"}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or of an unknown format."""


def training_payload(state: TrainState, rng: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The checkpoint dict for `state` (plain, unwrapped state dicts) plus `extra` entries.

    `rng` holds every rank's random streams (capture_rng), in rank order.
    """
    return {
        "model": state.model.state_dict(),
        "ema": state.ema.module.state_dict() if state.ema is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "loss": state.loss.state_dict(),
        "step": state.step,
        "rng": rng,
        **extra,
    }


def non_finite_parts(state: TrainState) -> list[str]:
    """Which of the model's weights, the EMA's and the optimizer's state hold inf or NaN (empty
    when all are finite). One host sync per part, so cheap enough for every save."""
    parts = {
        "model weights": state.model.state_dict().values(),
        "EMA weights": state.ema.module.state_dict().values() if state.ema is not None else [],
        "optimizer state": (
            value for entry in state.optimizer.state.values() for value in entry.values()
        ),
    }
    broken = []
    for name, values in parts.items():
        flags = [
            torch.isfinite(value).all()
            for value in values
            if isinstance(value, torch.Tensor) and value.is_floating_point()
        ]
        if flags and not bool(torch.stack(flags).all()):
            broken.append(name)
    return broken


def model_from_checkpoint(
    checkpoint: dict[str, Any], weights: str = "auto", image_size: int | None = None
) -> tuple[torch.nn.Module, str]:
    """The trained model in `checkpoint`, rebuilt from its config through the allowlist.

    Args:
        weights: "auto" (what scored best on the checkpoint's epoch), "raw" or "ema".
        image_size: for backbones fixed at build time (ViT, Swin); default the run's own.
    Returns:
        (model on CPU in eval mode, "raw" or "ema": which weights were loaded).
    """
    from q2l.training.build import (
        build_model,  # build imports the model zoo; only this needs it here
    )

    chosen = checkpoint.get("eval_weights", "raw") if weights == "auto" else weights
    if chosen not in ("raw", "ema") or checkpoint.get(_STATE_KEYS[chosen]) is None:
        raise InputError(
            f"weights={weights!r}: choose auto, raw or ema (ema only if the run kept one)"
        )
    config = checkpoint["config"]
    if image_size is not None:
        config = {**config, "dataset": {**config["dataset"], "image_size": image_size}}
    model = build_model(config, len(checkpoint["class_names"]), pretrained=False, trusted=False)
    model.load_state_dict(checkpoint[_STATE_KEYS[chosen]])
    return model.eval(), chosen


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict(strict=True) with every mismatched key named in one error."""
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        raise InputError(
            f"checkpoint {source} does not fit this model: {len(mismatched)} mismatched "
            f"({and_more(mismatched)}), {len(missing)} missing ({and_more(missing)}), "
            f"{len(unexpected)} unexpected ({and_more(unexpected)})"
        )
    model.load_state_dict(state)


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write `payload` to `path` atomically (q2l.utils.atomic): a crash or a full disk during the
    write leaves the previous file at `path` untouched, and no partial file."""
    path = Path(path)
    payload = {
        "format_version": FORMAT_VERSION,
        "q2l_version": q2l.__version__,
        "torch_version": str(torch.__version__),
        **payload,
    }
    writer = None
    try:
        with atomic_write(path) as handle:
            writer = _RecordingWriter(handle)
            torch.save(payload, writer)
    except (OSError, RuntimeError) as error:
        # torch reports a failed write as "[enforce fail ...] unexpected pos"; the OSError behind it
        # ("No space left on device") is what the user needs to read.
        cause = (writer.error if writer else None) or error
        if not isinstance(cause, OSError):
            raise
        kept = (
            f"the previous {path.name} is intact"
            if path.exists()
            else f"no earlier {path.name} existed"
        )
        raise CheckpointError(
            f"cannot write checkpoint {path}: {cause.strerror or cause}; {kept}"
        ) from cause


class _RecordingWriter:
    """The file object torch.save writes to, keeping the OSError a write raised (torch drops it)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a q2l checkpoint on CPU with weights_only=True, its checksums verified, in today's
    format (q2l.training.checkpoint_format.upgrade); clear errors for bad files."""
    path = Path(path)
    try:
        payload = load_torch_file(path, "checkpoint")
    except WeightsFileError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} is not a q2l checkpoint (no format_version)")
    if payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {payload['format_version']}, newer than this q2l "
            f"understands ({FORMAT_VERSION}); upgrade q2l"
        )
    return upgrade(payload)


def find_resumable(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The readable checkpoint in `directory` with the highest recorded step, as (path, payload).

    Candidates are last.pt and the periodic step-N.pt files; each one's step is read from the file
    itself (memory-mapped, so cheap), because a last.pt interrupted mid-write stays at its older
    step while a newer step-N.pt exists. On equal steps last.pt wins. A corrupt or truncated file is
    skipped with a warning naming it and the one used instead.
    """
    directory = Path(directory)
    ranked, skipped = [], []
    for path in directory.glob("*.pt"):
        if path.name != "last.pt" and not PERIODIC_PATTERN.match(path.name):
            continue
        try:
            step = int(load_torch_file(path, "checkpoint", mmap=True)["step"])
        except (WeightsFileError, KeyError, TypeError, ValueError) as error:
            log.warning("skipping unreadable checkpoint: %s", error)
            skipped.append(path.name)
            continue
        ranked.append((step, path.name == "last.pt", path))
    for _, _, path in sorted(ranked, key=lambda item: item[:2], reverse=True):
        try:
            payload = load_checkpoint(path)
        except CheckpointError as error:
            log.warning("skipping unreadable checkpoint: %s", error)
            skipped.append(path.name)
            continue
        if skipped:
            log.warning("resuming from %s instead of the unreadable %s", path, ", ".join(skipped))
        return path, payload
    if skipped:
        raise CheckpointError(
            f"no readable checkpoint in {directory}; unreadable: {', '.join(skipped)}"
        )
    return None


# What evaluation, export, prediction and fine-tuning (init_from) need: best.pt and the top-k files
# hold these only, not the optimizer, scheduler, scaler or random streams that resuming needs.
WEIGHTS_KEYS = (
    "model",
    "ema",
    "config",
    "class_names",
    "eval_weights",
    "metrics",
    "history",
    "epoch",
    "step",
    "best_metric",
    "best_epoch",
    "precision",
)
TOP_PATTERN = re.compile(r"^top-(-?[0-9.]+|nan)-epoch(\d+)\.pt$")


def weights_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The part of a training checkpoint that evaluation and fine-tuning use (WEIGHTS_KEYS)."""
    return {key: payload[key] for key in WEIGHTS_KEYS if key in payload}


def top_checkpoint_name(value: float, epoch: int) -> str:
    """`top-<monitored value>-epoch<N>.pt`: the name carries what ranks it (restart-safe)."""
    return f"top-{value:08.4f}-epoch{epoch:04d}.pt"


def keep_top(directory: str | Path, keep: int) -> None:
    """Delete all but the `keep` top-*.pt files with the highest values (ties: the earlier epoch
    stays), found by scanning the folder."""
    ranked = []
    for path in Path(directory).glob("top-*.pt"):
        found = TOP_PATTERN.match(path.name)
        if found:
            ranked.append((-float(found.group(1)), int(found.group(2)), path))
    for _, _, path in sorted(ranked)[keep:]:
        path.unlink(missing_ok=True)


def purge_periodic(directory: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` step-N.pt files, found by scanning (restart-safe)."""
    periodic = sorted(
        (p for p in Path(directory).glob("step-*.pt") if PERIODIC_PATTERN.match(p.name)),
        key=lambda p: int(PERIODIC_PATTERN.match(p.name).group(1)),
    )
    for path in periodic[: max(len(periodic) - keep, 0)]:
        path.unlink(missing_ok=True)
