"""One checkpoint schema: written atomically, read back safely, restored into a TrainState.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so it loads with
`torch.load(weights_only=True)`: nothing in it is pickled code, and the config it carries is a
plain container that is only rebuilt through allowlists (q2l.build.instantiate_allowed).

Keys: format_version, q2l_version, torch_version; the TrainState (model, ema, optimizer,
scheduler, scaler, loss, step, rng); progress (the loop's position), epoch, best_metric,
best_epoch, eval_weights ("model" or "ema": the better on the epoch), metrics, history,
class_names, config, precision (the resolved autocast precision, which evaluation reuses).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import q2l
from q2l.atomic import atomic_write, fsync_dir
from q2l.engine import TrainState
from q2l.messages import and_more
from q2l.models.weights import WeightsFileError, load_torch_file

FORMAT_VERSION = 1
PERIODIC_PATTERN = re.compile(r"^step-(\d+)\.pt$")

log = logging.getLogger(__name__)


# Config keys that may differ on resume: they change how a run is watched or launched, not what
# it computes.
RESUME_IGNORED_KEYS = (
    "resume",
    "allow_config_change",
    "init_from",
    "prepare",
    "trainer.progress_bar",
    "trainer.log_every_n_steps",
    "trainer.checkpoint_every_steps",
    "trainer.keep_last",
    "trainer.slurm_requeue",
    "dataset.num_workers",
    "dataset.validate",
    "dataset.cache_dir",
    "backbone.weights",
    "backbone.pretrained",
)
# Config keys added after runs were started, with the value a run had in effect before: a saved
# config without the key compares as if it held that value, so such runs resume unchanged.
ADDED_KEYS_WERE: dict[str, Any] = {
    "backbone.freeze": "none",
    "backbone.frozen_bn": False,
    "backbone.normalization": "pretrained",
    "model.norm": "post",  # runs from before the option: the official layout
    "trainer.monitor": "mAP",
    "trainer.early_stop_rule": "best",
    "loss.class_priors_file": None,
    "augment.randaugment_policy": "torchvision",
    "dataset.decode": "workers",
}
# Keys retyped after runs were started: (saved, current) value pairs that compute the same.
COMPATIBLE_CHANGES: dict[str, set[tuple]] = {
    "backbone.timm_kwargs": {(None, "<absent>")},  # None became {} (an empty dict has no leaves)
    "model.decoder_self_attention": {(False, "none"), (True, "all")},
}
# Changes to these make the saved LR schedule stale.
SCHEDULE_KEYS = (
    "trainer.epochs",
    "schedule.",
    "optimizer.lr",
    "dataset.batch_size",
    "trainer.limit_train_batches",
)


class CheckpointError(RuntimeError):
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


def restore_training(
    state: TrainState,
    checkpoint: dict[str, Any],
    source: Path,
    changes: list[str],
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Put every part of `state` (and every RNG) back as `checkpoint` had it.

    `changes` are the accepted config changes (`resume_changes`); with a changed schedule the
    new schedule is followed from the saved step instead of the saved schedule state. Each rank
    gets back its own random streams; with another world size than the checkpoint's they are
    reseeded from the step instead (training continues correctly, not bitwise as it would have).
    """
    load_strict(state.model, checkpoint["model"], source)
    if state.ema is not None and checkpoint.get("ema") is not None:
        state.ema.module.load_state_dict(checkpoint["ema"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scaler.load_state_dict(checkpoint["scaler"])
    state.loss.load_state_dict(checkpoint["loss"])
    state.step = int(checkpoint["step"])
    if any(change.startswith(SCHEDULE_KEYS) for change in changes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
            for _ in range(state.step):
                state.scheduler.step()
    else:
        state.scheduler.load_state_dict(checkpoint["scheduler"])
    saved = checkpoint["rng"] if isinstance(checkpoint["rng"], list) else [checkpoint["rng"]]
    if len(saved) == world_size:
        restore_rng(saved[rank])
    else:
        log.warning(
            "resuming a %d-process run with %d processes: random streams (dropout, MixUp) are "
            "reseeded; data order and augmentation follow the seed as before",
            len(saved),
            world_size,
        )
        seed = int(checkpoint["config"].get("seed", 0)) + 1_000_003 * state.step + rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


def resume_changes(
    checkpoint: dict[str, Any], source: Path, config: dict[str, Any], allow_config_change: bool
) -> list[str]:
    """The config changes since `checkpoint`; refuses (ValueError with the diff) unless allowed."""
    changes = config_diff(checkpoint["config"], config, ignore=RESUME_IGNORED_KEYS)
    if changes and not allow_config_change:
        raise ValueError(
            f"resume from {source}: the config differs from the checkpoint's:\n  "
            + "\n  ".join(changes)
            + "\nrerun with the original settings, or pass "
            "allow_config_change=true to continue anyway. Nothing was changed"
        )
    if changes:
        log.warning(
            "resuming from %s with a changed config (allow_config_change=true):\n  %s",
            source,
            "\n  ".join(changes),
        )
    return changes


def model_from_checkpoint(
    checkpoint: dict[str, Any], weights: str = "auto", image_size: int | None = None
) -> tuple[torch.nn.Module, str]:
    """The trained model in `checkpoint`, rebuilt from its config through the allowlist.

    Args:
        weights: "auto" (what scored best on the checkpoint's epoch), "raw" or "ema".
        image_size: for backbones fixed at build time (ViT, Swin); default the run's own.
    Returns:
        (model on CPU in eval mode, "model" or "ema": which weights were loaded).
    """
    from q2l.build import build_model  # build imports the model zoo; only this needs it here

    chosen = (
        checkpoint.get("eval_weights", "model")
        if weights == "auto"
        else {"raw": "model", "ema": "ema"}.get(weights)
    )
    if chosen is None or checkpoint.get(chosen) is None:
        raise ValueError(
            f"weights={weights!r}: choose auto, raw or ema (ema only if the run kept one)"
        )
    config = checkpoint["config"]
    if image_size is not None:
        config = {**config, "dataset": {**config["dataset"], "image_size": image_size}}
    model = build_model(config, len(checkpoint["class_names"]), pretrained=False, trusted=False)
    model.load_state_dict(checkpoint[chosen])
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
        raise ValueError(
            f"checkpoint {source} does not fit this model: {len(mismatched)} mismatched "
            f"({and_more(mismatched)}), {len(missing)} missing ({and_more(missing)}), "
            f"{len(unexpected)} unexpected ({and_more(unexpected)})"
        )
    model.load_state_dict(state)


def load_matching_weights(model: torch.nn.Module, checkpoint: dict[str, Any], source: Path) -> None:
    """Fine-tuning start (`init_from`): load weights whose name and shape match; log the rest."""
    own = model.state_dict()
    usable = {k: v for k, v in checkpoint["model"].items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(checkpoint["model"]) - set(usable))
    fresh = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    log.info(
        "init_from=%s: loaded %d tensors; skipped (shape or name differs) %s; newly initialised %s",
        source,
        len(usable),
        and_more(skipped),
        and_more(fresh),
    )


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write `payload` to `path` atomically (q2l.atomic): a crash or a full disk during the write
    leaves the previous file at `path` untouched, and no partial file."""
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


def link_checkpoint(source: str | Path, target: str | Path) -> None:
    """Make `target` the same checkpoint as `source` (hard link, else copy), atomically."""
    source, target = Path(source), Path(target)
    temporary = target.with_name(f".{target.name}.link.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:  # file systems without hard links
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)
    fsync_dir(target.parent)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a q2l checkpoint on CPU with weights_only=True; clear errors for bad files."""
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
    return payload


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


def purge_periodic(directory: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` step-N.pt files, found by scanning (restart-safe)."""
    periodic = sorted(
        (p for p in Path(directory).glob("step-*.pt") if PERIODIC_PATTERN.match(p.name)),
        key=lambda p: int(PERIODIC_PATTERN.match(p.name).group(1)),
    )
    for path in periodic[: max(len(periodic) - keep, 0)]:
        path.unlink(missing_ok=True)


def capture_rng() -> dict[str, Any]:
    """Every random stream the loop draws from, in weights_only-loadable form."""
    version, keys, position = np.random.get_state(legacy=True)[:3]
    state = {
        "python": random.getstate(),
        "numpy": [version, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(position)],
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo `capture_rng`: the next random draw is the one the saved run would have made."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    version, keys, position = state["numpy"]
    np.random.set_state((version, keys.numpy().astype(np.uint32), position, 0, 0.0))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_diff(
    saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()
) -> list[str]:
    """Lines `key: saved -> current` for every leaf that differs, keys under `ignore` skipped."""
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    lines = []
    for key in sorted(set(flat_saved) | set(flat_current)):
        if any(key == prefix or key.startswith(prefix + ".") for prefix in ignore):
            continue
        before, after = flat_saved.get(key, "<absent>"), flat_current.get(key, "<absent>")
        if before == "<absent>" and after != "<absent>":
            # A key added since the run started: show the value the run had in effect.
            before = ADDED_KEYS_WERE.get(key, before)
        if before != after and (before, after) not in COMPATIBLE_CHANGES.get(key, ()):
            lines.append(f"{key}: {before!r} -> {after!r}")
    return lines


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
