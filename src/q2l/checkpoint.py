"""One checkpoint schema, written atomically and read back safely.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so it loads with
`torch.load(weights_only=True)`: nothing in it is pickled code, and the config it carries is a
plain container that is never instantiated blindly.

Keys: format_version, q2l_version, torch_version, model, ema, optimizer, scheduler, scaler,
loss, epoch (completed epochs), step (optimizer steps), best_metric, best_epoch, eval_weights
("model" or "ema": the better of the two on this epoch), metrics, class_names, config.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

import q2l

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or of an unknown format."""


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write `payload` to `path` atomically: temp file in the same folder, fsync, rename.

    A crash or a full disk during the write leaves the previous file at `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, "q2l_version": q2l.__version__,
               "torch_version": torch.__version__, **payload}
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError/UnpicklingError/EOFError/... by cause
        raise CheckpointError(
            f"checkpoint {path} cannot be read; it is truncated, corrupt or not a q2l checkpoint ({error})"
        ) from error
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
