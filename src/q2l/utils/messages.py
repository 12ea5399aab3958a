"""Error and report messages that list offending items: the first few, then a count of the rest."""

from __future__ import annotations

from collections.abc import Iterable


def and_more(items: Iterable[object], shown: int = 10, separator: str = ", ") -> str:
    """'a, b, c and 7 more': the first `shown` items joined, then how many were left out."""
    items = [str(item) for item in items]
    text = separator.join(items[:shown])
    return text + (f" and {len(items) - shown} more" if len(items) > shown else "")
