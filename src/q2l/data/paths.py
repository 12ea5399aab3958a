"""Image file names read from annotations, turned into paths that stay under the image root.

Annotation files are input like any other: a `file_name` of "/etc/passwd" or "../../secret.png"
must not make a data loader read outside the folder the user pointed at. Every format reader goes
through `confine_all`, which rejects such names (all of them in one error) instead of resolving
them. The check is lexical, so an image folder that is itself a symlink keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

from q2l.utils.errors import InputError
from q2l.utils.messages import and_more


def confine_all(
    image_root: str | Path, file_names: Iterable[str], source: str | Path
) -> list[Path]:
    """`image_root / name` for every name; raises one ValueError naming every escaping name.

    Args:
        image_root: folder the names are relative to.
        file_names: names as the annotation file (`source`) spells them.
        source: the annotation file, named in the error.
    """
    image_root = Path(image_root)
    paths, escaping = [], []
    for name in file_names:
        if _escapes(name):
            escaping.append(name)
        else:
            paths.append(image_root / name)
    if escaping:
        raise InputError(
            f"{source}: file name escapes the image folder {image_root} (absolute or containing "
            f"'..') in {len(escaping)} image(s): {and_more(map(repr, escaping))}"
        )
    return paths


def _escapes(name: str) -> bool:
    """True for empty, absolute (POSIX or Windows, drive or UNC) or '..'-containing names."""
    if not name or "\x00" in name:
        return True
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        return True
    # Backslashes separate parts on Windows, so "..\\x" escapes there even if POSIX reads one name.
    return ".." in posix.parts or ".." in windows.parts
