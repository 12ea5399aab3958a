"""Folders the demo builds, and may later rebuild, recognised by a marker file written last.

A demo step (the digits data set, the digits-pretrained backbone) writes into a folder the user
can point anywhere (`dataset.root`, `Q2L_DATA_DIR`). Nothing that q2l did not create may be
moved, deleted or rewritten there, so `build_owned_folder`:

- builds into a temporary sibling stamped as q2l's, writes the marker (listing every file) last,
  then renames the sibling into place: `root` is absent, complete, or the previous build;
- returns at once when `root`'s marker records the same kind and arguments;
- replaces an existing `root` only when it is empty, or when its marker says q2l built it and it
  holds nothing beyond the files that marker lists;
- refuses anything else with `FolderNotOursError`, naming the folder and what it holds, before
  any work is done;
- clears leftovers of crashed builds only when they carry q2l's stamp.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from q2l.utils.messages import and_more

log = logging.getLogger(__name__)

MARKER_NAME = ".q2l-built.json"
# Written first into every temporary build folder: only folders carrying it count as leftovers.
_STAMP_NAME = ".q2l-building"
# Leftovers this old belong to a crashed build, never to a running one (demo builds take seconds).
_STALE_AFTER_SECONDS = 3600.0
_SHOWN = 5


def data_dir_hint(key: str) -> str:
    """How a user redirects a demo build: the environment variable and the config key."""
    where = os.environ.get("Q2L_DATA_DIR") or "unset, so ./data"
    return (
        f"The demo writes under Q2L_DATA_DIR (now {where}): set Q2L_DATA_DIR to a writable folder "
        f"of its own, or pass {key}=<an empty or new folder>."
    )


class FolderNotOursError(FileExistsError):
    """The target folder holds files q2l did not write; nothing was changed."""


def build_owned_folder(
    root: str | Path,
    kind: str,
    arguments: dict[str, Any],
    build: Callable[[Path], None],
    hint: str = "",
) -> Path:
    """Make `root` hold what `build(folder)` writes for `arguments`, unless it already does.

    Args:
        root: the folder to produce.
        kind: what is built (e.g. "q2l-digits"); a marker of another kind is not a match.
        arguments: JSON-serialisable values that determine the content; a change rebuilds.
        build: writes the content into the (empty) folder it is given.
        hint: appended to errors: how the user picks another folder.
    Returns:
        `root` as a Path.
    """
    root = Path(root).expanduser()
    if marker_matches(root, kind, arguments):
        return root
    check_replaceable(root, kind, hint)  # before spending time on a build that could not be kept
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        temporary = root.parent / f".{root.name}.q2l-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temporary.mkdir()
        (temporary / _STAMP_NAME).write_text("")
    except OSError as error:
        raise PermissionError(f"cannot write {kind} to {root}: {error}. {hint}".rstrip()) from error
    _remove_abandoned_siblings(root, kind)
    try:
        build(temporary)
        (temporary / _STAMP_NAME).unlink()
        files = sorted(
            str(path.relative_to(temporary)) for path in temporary.rglob("*") if path.is_file()
        )
        marker = {"kind": kind, "arguments": arguments, "files": files}
        (temporary / MARKER_NAME).write_text(json.dumps(marker) + "\n")
        _move_into_place(temporary, root, kind, arguments, hint)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return root


def marker_matches(root: Path, kind: str, arguments: dict[str, Any]) -> bool:
    """True when `root` holds a finished build of `kind` with these `arguments`."""
    marker = _read_marker(root)
    return (
        marker is not None and marker.get("kind") == kind and marker.get("arguments") == arguments
    )


def check_replaceable(root: Path, kind: str, hint: str = "") -> None:
    """Raise FolderNotOursError unless `root` is absent, empty, or a build of `kind`, unchanged."""
    if not (root.exists() or root.is_symlink()):
        return
    if root.is_symlink() or not root.is_dir():
        raise FolderNotOursError(
            f"{root} exists and is not a folder q2l created; nothing was changed. {hint}".rstrip()
        )
    foreign = _foreign_entries(root, kind)
    if foreign:
        raise FolderNotOursError(
            f"refusing to write {kind} into {root}: it holds files q2l did not write "
            f"({and_more(foreign, _SHOWN)}). q2l never moves, deletes or rewrites a folder it did "
            "not create; nothing was changed. "
            f"{hint}".rstrip()
        )


def _foreign_entries(root: Path, kind: str) -> list[str]:
    """Files under `root` that its marker of `kind` does not list (all of them without a marker)."""
    marker = _read_marker(root)
    listed = (
        set(marker.get("files", [])) | {MARKER_NAME}
        if marker and marker.get("kind") == kind
        else set()
    )
    foreign = []
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_dir() and not path.is_symlink():
            continue  # a folder counts through its files; empty leftovers are harmless
        if relative not in listed:
            foreign.append(relative)
    return foreign


def _move_into_place(
    temporary: Path, root: Path, kind: str, arguments: dict[str, Any], hint: str
) -> None:
    """Rename the finished `temporary` to `root`, setting aside a previous build of ours first.

    Another process may finish first; a copy of its with our arguments is kept and ours dropped.
    """
    for _ in range(3):
        if marker_matches(root, kind, arguments):
            return
        if root.exists():
            check_replaceable(root, kind, hint)
            aside = root.parent / f".{root.name}.q2l-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(root, aside)  # readers never see a half-deleted root
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(
                temporary, root
            )  # atomic; fails if a concurrent build put a non-empty root there
            return
        except OSError:
            if not root.exists():
                raise
    raise RuntimeError(f"could not put {kind} in place at {root}: it keeps changing")


def _remove_abandoned_siblings(root: Path, kind: str) -> None:
    """Delete q2l-stamped temporary folders next to `root` left by builds that crashed."""
    now = time.time()
    for pattern in (f".{root.name}.q2l-tmp-*", f".{root.name}.q2l-old-*"):
        for path in root.parent.glob(pattern):
            ours = (path / _STAMP_NAME).is_file() or not _foreign_entries(path, kind)
            try:
                abandoned = now - path.stat().st_mtime > _STALE_AFTER_SECONDS
            except FileNotFoundError:
                continue
            if ours and abandoned:
                log.info("removing the leftover of an interrupted build: %s", path)
                shutil.rmtree(path, ignore_errors=True)


def _read_marker(root: Path) -> dict | None:
    try:
        marker = json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None
