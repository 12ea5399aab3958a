"""Continuing a run from a checkpoint: which config changes a resume accepts (`resume_changes`,
`config_diff`), putting the training state and every random stream back (`restore_training`,
`capture_rng`, `restore_rng`), and a fine-tuning start from another run's weights
(`load_matching_weights`, init_from)."""

from __future__ import annotations

import logging
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from q2l.training.checkpoint import load_strict
from q2l.training.engine import TrainState
from q2l.utils.errors import InputError
from q2l.utils.messages import and_more

log = logging.getLogger(__name__)


# Config keys that may differ on resume: they change how a run is watched or launched, not what
# it computes.
RESUME_IGNORED_KEYS = (
    "resume",
    "allow_config_change",
    "init_from",
    "prepare",
    "paths",  # where files are, not what is computed
    "logger",
    "trainer.progress_bar",
    "trainer.log_every_n_steps",
    "trainer.checkpoint_every_steps",
    "trainer.keep_last",
    "trainer.save_top_k",
    "trainer.slurm_requeue",
    "dataset.num_workers",
    "dataset.validate",
    "dataset.max_image_pixels",  # raised to let a run past an image it refused
    "dataset.cache_dir",
    "backbone.weights",
    "backbone.pretrained",
)


# Changes to these make the saved LR schedule stale.
SCHEDULE_KEYS = (
    "trainer.epochs",
    "schedule.",
    "optimizer.lr",
    "dataset.batch_size",
    "trainer.limit_train_batches",
)


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
    saved = checkpoint["rng"]
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
        raise InputError(
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
    """Lines `key: saved -> current` for every leaf that differs, keys under `ignore` skipped.

    `saved` comes from a loaded (so upgraded) checkpoint: keys added since its run started hold
    the value it had in effect."""
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    lines = []
    for key in sorted(set(flat_saved) | set(flat_current)):
        if any(key == prefix or key.startswith(prefix + ".") for prefix in ignore):
            continue
        before, after = flat_saved.get(key, "<absent>"), flat_current.get(key, "<absent>")
        if before != after:
            lines.append(f"{key}: {before!r} -> {after!r}")
    return lines


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
