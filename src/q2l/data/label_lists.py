"""Label names per image -> (N, K) int8 matrices, and class lists read from files.

Shared by the formats that name labels as strings (tables, NUS-WIDE, Open Images). One image's
labels are three lists of names: present (1), verified absent (0) and unknown (-1); a class an
image does not mention is absent or unknown as the format says (`unlisted`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from q2l.utils.errors import InputError
from q2l.utils.messages import and_more

UNLISTED_POLICIES = ("negative", "unknown")
UNKNOWN_LABEL_POLICIES = ("error", "ignore")


class ImageLabels(NamedTuple):
    """The label names of one image, as its annotation row gives them."""

    positives: Sequence[str] = ()
    negatives: Sequence[str] = ()
    unknown: Sequence[str] = ()


def read_class_file(path: str | Path) -> list[str]:
    """Class names, one per line, in file order; blank lines skipped, duplicates refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class list file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name]
    check_class_names(names, path)
    return names


def check_class_names(names: Sequence[str], source: str | Path) -> None:
    """Refuse an empty class list or one naming a class twice (columns would be ambiguous)."""
    if not names:
        raise InputError(f"{source}: no class names")
    repeated = [name for name, count in collections.Counter(names).items() if count > 1]
    if repeated:
        raise InputError(f"{source}: class names listed more than once: {and_more(repeated)}")


def split_names(text: str | Sequence[str] | None, delimiter: str) -> list[str]:
    """'cat|dog' -> ['cat', 'dog']; a list passes through; empty or missing -> []."""
    if text is None:
        return []
    parts = text.split(delimiter) if isinstance(text, str) else [str(part) for part in text]
    return [part.strip() for part in parts if part.strip()]


def names_seen(rows: Iterable[ImageLabels]) -> list[str]:
    """Sorted union of every label name the rows mention (the class list when none is given)."""
    seen: set[str] = set()
    for row in rows:
        seen.update(row.positives, row.negatives, row.unknown)
    return sorted(seen)


def label_matrix(
    rows: Sequence[ImageLabels],
    class_names: Sequence[str],
    source: str | Path,
    unlisted: str = "negative",
    unknown_labels: str = "error",
) -> np.ndarray:
    """(N, K) int8 of {1, 0, -1} from N rows of label names.

    A name listed twice for one image takes the strongest statement: present over absent over
    unknown. Names outside
    `class_names` raise one ValueError listing them (unknown_labels="error") or are dropped
    ("ignore", for data sets whose files name more classes than the chosen class list).
    """
    if unlisted not in UNLISTED_POLICIES:
        raise ValueError(f"unlisted must be one of {UNLISTED_POLICIES}, got {unlisted!r}")
    if unknown_labels not in UNKNOWN_LABEL_POLICIES:
        raise InputError(
            f"unknown_labels must be one of {UNKNOWN_LABEL_POLICIES}, got {unknown_labels!r}"
        )
    column = {name: index for index, name in enumerate(class_names)}
    labels = np.full(
        (len(rows), len(class_names)), 0 if unlisted == "negative" else -1, dtype=np.int8
    )
    strangers: collections.Counter[str] = collections.Counter()
    for index, row in enumerate(rows):
        # Unknown first, then absent, then present: the later write wins.
        for names, value in ((row.unknown, -1), (row.negatives, 0), (row.positives, 1)):
            for name in names:
                if name in column:
                    labels[index, column[name]] = value
                else:
                    strangers[name] += 1
    if strangers and unknown_labels == "error":
        raise InputError(
            f"{source}: {len(strangers)} label name(s) not in the class list (name: rows): "
            f"{and_more(f'{name!r}: {count}' for name, count in strangers.most_common())}. "
            "Fix the annotations, add the classes to the class list, or set unknown_labels=ignore"
        )
    return labels
