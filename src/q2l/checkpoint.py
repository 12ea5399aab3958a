"""One checkpoint schema, written atomically and read back safely.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so it loads with
`torch.load(weights_only=True)`: nothing in it is pickled code, and the config it carries is a
plain container that is never instantiated blindly.

Keys: format_version, q2l_version, torch_version, model, ema, optimizer, scheduler, scaler,
loss, epoch (completed epochs), step (optimizer steps), best_metric, best_epoch, eval_weights
("model" or "ema": the better of the two on this epoch), metrics, class_names, config.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import q2l
from q2l.models.weights import WeightsFileError, load_torch_file

FORMAT_VERSION = 1
PERIODIC_PATTERN = re.compile(r"^step-(\d+)\.pt$")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or of an unknown format."""


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write `payload` to `path` atomically: temp file in the same folder, fsync, rename.

    A crash or a full disk during the write leaves the previous file at `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, "q2l_version": q2l.__version__,
               "torch_version": str(torch.__version__), **payload}
    try:
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    except OSError as error:
        raise CheckpointError(f"cannot write checkpoint {path}: {error}") from error
    writer = _RecordingWriter(handle)
    try:
        with handle:
            torch.save(payload, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except (OSError, RuntimeError) as error:
        Path(handle.name).unlink(missing_ok=True)
        # torch reports a failed write as "[enforce fail ...] unexpected pos"; the OSError behind it
        # ("No space left on device") is what the user needs to read.
        cause = writer.error or error
        if not isinstance(cause, OSError):
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"no earlier {path.name} existed"
        raise CheckpointError(f"cannot write checkpoint {path}: {cause.strerror or cause}; {kept}") from cause
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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
        import shutil

        shutil.copyfile(source, temporary)
    os.replace(temporary, target)
    _fsync_dir(target.parent)


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


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_resumable(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The readable checkpoint in `directory` with the highest recorded step: (path, payload), or None.

    Candidates are last.pt and the periodic step-N.pt files; each one's step is read from the file
    itself (memory-mapped, so cheap), because a last.pt interrupted mid-write stays at its older
    step while a newer step-N.pt exists. On equal steps last.pt wins. A corrupt or truncated file
    is skipped with a warning naming it and the one used instead.
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
        raise CheckpointError(f"no readable checkpoint in {directory}; unreadable: {', '.join(skipped)}")
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


def config_diff(saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Lines `key: saved -> current` for every leaf that differs, keys under `ignore` skipped."""
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
