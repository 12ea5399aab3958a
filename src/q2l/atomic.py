"""Writing a file so that readers see the old version or the new one, never half of either.

Checkpoints, metric summaries and label caches are all written this way: into a temporary file
beside the target (`.<name>.<random>.tmp`, which a restarted run may delete), flushed to disk, then
renamed over the target, and the folder flushed so that the rename itself survives a power cut.
`link_new` instead publishes a finished file under a name that must not exist yet (predictions,
exports): it never replaces one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Yield an open temporary file; a clean exit renames it onto `path`, an error deletes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        mode, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def link_new(source: str | Path, target: str | Path, exists_message: str) -> None:
    """Give `source` the name `target` without ever replacing a file there: a hard link, then
    `source` removed (or, on a file system without hard links, a rename after a check). Raises
    FileExistsError(exists_message) if `target` exists; `source` is then left as it was."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise FileExistsError(exists_message) from None
    except OSError:  # a file system without hard links: check, then rename
        if Path(target).exists():
            raise FileExistsError(exists_message) from None
        os.rename(source, target)
        return
    Path(source).unlink()


def fsync_dir(directory: Path) -> None:
    """Persist renames in `directory`: the folder entry itself must reach the disk."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)
