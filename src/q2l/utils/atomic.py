"""Writing a file so that readers see the old version or the new one, never half of either.

Checkpoints, metric summaries and label caches are all written this way: into a temporary file
beside the target (`.<name>.<random>.tmp`, which a restarted run may delete), flushed to disk, then
renamed over the target, and the folder flushed so that the rename itself survives a power cut.
`link_new` instead publishes a finished file under a name that must not exist yet (predictions,
exports): it never replaces one.

Files written here get the mode any other program's would: `0o666 & ~umask` (the temporary file
starts as 0600, and a rename keeps the mode; `give_default_mode` does the same for a file a library
created 0600). Folders are made with `0o777 & ~umask`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
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
            give_default_mode(handle.fileno())
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


def file_mode() -> int:
    """The mode a newly created file gets from open() under this process's umask: 0o666 & ~umask."""
    return 0o666 & ~current_umask()


def current_umask() -> int:
    """This process's umask, read without changing it (Linux: /proc/self/status). Elsewhere it is
    read once, by setting and restoring it, which a thread creating a file meanwhile could see."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    global _UMASK
    with _UMASK_LOCK:
        if _UMASK is None:
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None
_UMASK_LOCK = threading.Lock()


def give_default_mode(file: int | str | Path) -> None:
    """Give a file (path or open descriptor) the mode open() would have created it with
    (file_mode): for files made 0600 by tempfile or by a library (safetensors' save_file)."""
    try:
        os.chmod(file, file_mode())
    except OSError:
        pass  # file systems without Unix modes (FAT, some network mounts) refuse; nothing to keep


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
