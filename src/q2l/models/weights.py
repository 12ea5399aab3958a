"""Reading weight files from disk: never executing code from them, never trusting damaged bytes,
and saying plainly what is wrong.

`torch.load(weights_only=True)` refuses a file that pickles Python objects, and its error then
suggests retrying with `weights_only=False`, which would run whatever code the file carries. q2l
never does that and never suggests it: `load_torch_file` names the file and the refused object.

A file written by `torch.save` is a zip archive whose every record (each tensor's bytes, the
pickled structure) carries a CRC-32 checksum, but `torch.load` never checks them: a checkpoint
with flipped bits loads silently, with wrong weights. `load_torch_file` checks every record's
checksum first (`verify_checksums`) and refuses a damaged file, naming it and the record.
"""

from __future__ import annotations

import pickle
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from q2l.utils.errors import InputError


class WeightsFileError(InputError):
    """A weights or checkpoint file that is missing, unreadable or holds more than plain data."""


def load_torch_file(
    path: str | Path, what: str = "file", mmap: bool = False, numpy_scalars: bool = False
) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` with errors that name `path`.

    Args:
        what: how errors name the file ("checkpoint", "backbone weights file", ...).
        mmap: map tensors from the file instead of reading them (cheap look at small entries).
        numpy_scalars: also accept NumPy scalars (numbers rebuilt from their bytes and dtype; no
            code runs), which other projects' checkpoints hold (the official Query2Label's best
            mAP is a numpy.float64).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{what} not found: {path}")
    if not mmap:  # a memory-mapped look reads a few entries only; a full load checks them all
        verify_checksums(path, what)
    allowed = _numpy_scalar_globals() if numpy_scalars else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        culprit = f" (it pickles {found.group(1)})" if found else ""
        raise WeightsFileError(
            f"{what} {path} holds Python objects beyond tensors and plain data{culprit}. q2l loads "
            "only tensors, numbers, strings and containers from such files and never runs code "
            "stored in one; save a plain state dict (or .safetensors) instead"
        ) from None
    except Exception as error:  # torch raises RuntimeError/EOFError/... depending on the damage
        raise WeightsFileError(
            f"{what} {path} cannot be read; it is truncated, corrupt or not a PyTorch file "
            f"({error})"
        ) from None


def verify_checksums(path: Path, what: str = "file") -> None:
    """Check the CRC-32 of every record of a torch.save zip archive; raise WeightsFileError naming
    the first damaged one. Files in torch's legacy (non-zip) format carry no checksum and pass.

    Reads the whole file once (about as long as loading it, from the page cache).
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as error:
        raise WeightsFileError(
            f"{what} {path} is damaged: its zip structure cannot be read ({error})"
        ) from None
    if damaged is not None:
        raise WeightsFileError(
            f"{what} {path} is damaged: record {damaged!r} fails its CRC-32 checksum (the bytes "
            "changed after the file was written: a disk, copy or transfer error). It was not used"
        )


def _numpy_scalar_globals() -> list[Any]:
    """What a pickled NumPy scalar names: the scalar constructor (under NumPy 1's and 2's module
    paths) and the plain numeric dtypes."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtypes = {type(np.dtype(code)) for code in ("f8", "f4", "f2", "i8", "i4", "u1", "b1")}
    return [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtypes,
    ]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file; wrappers and `module.` prefixes removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise WeightsFileError(
                f"backbone weights file {path} cannot be read ({error})"
            ) from None
    loaded = load_torch_file(path, "backbone weights file")
    state = unwrap_state_dict(loaded, ("state_dict", "model", "state_dict_ema"))
    if state is None:
        raise WeightsFileError(
            f"backbone weights file {path} holds a {type(loaded).__name__}, not a state dict"
        )
    return state


def unwrap_state_dict(obj: Any, containers: tuple[str, ...]) -> dict[str, Any] | None:
    """The state dict in a loaded weights file: the first of `containers` that `obj` holds as a
    dict (e.g. "state_dict", "model"), else `obj` itself, with DDP's `module.` prefixes removed;
    None when that is not a dict."""
    state = obj
    for key in containers:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        return None
    return {k.removeprefix("module."): v for k, v in state.items()}
