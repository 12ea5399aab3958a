"""Progress reporting for train, eval and predict: one policy, three outcomes.

- a tqdm bar when the stream (stderr) is a terminal;
- plain periodic log lines ("eval 120/500 (24%) 3.1 it/s, eta 2m02s") when it is not, as in
  SLURM logs or `> file 2>&1`, where a bar's carriage returns pile up into one unreadable line:
  one every Q2L_PROGRESS_INTERVAL seconds (default 30), and a closing line after them, so a loop
  shorter than that adds nothing to the log;
- nothing when the caller turns it off (`trainer.progress_bar=false`, `progress_bar=false`) or
  the environment sets TQDM_DISABLE (tqdm's own switch, honoured for both forms).

Both visible forms accept `set_postfix(loss=..., lr=...)`; the lines repeat the latest postfix.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

log = logging.getLogger("q2l.utils.progress")

# Seconds between two periodic lines: often enough to see a job move, rare enough for a log file.
LINE_INTERVAL_S = 30.0
INTERVAL_VARIABLE = "Q2L_PROGRESS_INTERVAL"
_FALSE_WORDS = ("", "0", "false", "no", "off")


def progress_mode(enabled: bool, stream: IO | None = None) -> str:
    """ "bar", "lines" or "off" for a progress display on `stream` (default stderr)."""
    if not enabled or os.environ.get("TQDM_DISABLE", "").strip().lower() not in _FALSE_WORDS:
        return "off"
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def track(
    iterable: Iterable,
    total: int | None,
    description: str,
    enabled: bool = True,
    stream: IO | None = None,
    interval_s: float | None = None,
) -> Iterable:
    """`iterable`, reporting progress as `progress_mode` decides; has `set_postfix(**values)`.

    Args:
        total: number of items expected (None: unknown, no percentage or ETA).
        description: what is counted, first word of every line ("train", "eval", "predict").
        enabled: the caller's switch; False shows nothing.
        interval_s: seconds between periodic lines; default Q2L_PROGRESS_INTERVAL or 30.
    """
    mode = progress_mode(enabled, stream)
    if mode == "lines":
        if interval_s is None:
            interval_s = float(os.environ.get(INTERVAL_VARIABLE) or LINE_INTERVAL_S)
        return PeriodicLines(iterable, total, description, interval_s)
    return tqdm(
        iterable,
        total=total,
        desc=description,
        leave=False,
        disable=mode == "off",
        file=sys.stderr if stream is None else stream,
        dynamic_ncols=True,
    )


class PeriodicLines:
    """Iterate `iterable`, logging a progress line every `interval_s` seconds and, if any was
    logged, a closing line with the item count and elapsed time."""

    def __init__(
        self, iterable: Iterable, total: int | None, description: str, interval_s: float
    ) -> None:
        self.iterable = iterable
        self.total = total
        self.description = description
        self.interval_s = interval_s
        self.postfix: dict[str, Any] = {}
        self.count = 0

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __iter__(self) -> Iterator:
        start = last = time.monotonic()
        logged = False
        for item in self.iterable:
            yield item
            self.count += 1
            now = time.monotonic()
            if now - last >= self.interval_s:
                log.info("%s", self.line(now - start))
                last, logged = now, True
        if logged:
            elapsed = _clock(time.monotonic() - start)
            log.info("%s done: %d in %s", self.description, self.count, elapsed)

    def line(self, elapsed: float) -> str:
        """'<description> n/total (p%) r it/s, eta t[, postfix]' for `elapsed` seconds so far."""
        rate = self.count / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.description} {self.count}"]
        if self.total:
            parts[0] += f"/{self.total} ({100 * self.count / self.total:.0f}%)"
        parts.append(f"{rate:.2f} it/s")
        if self.total and rate > 0:
            parts.append(f"eta {_clock((self.total - self.count) / rate)}")
        text = " ".join(parts[:2]) + (f", {parts[2]}" if len(parts) > 2 else "")
        if self.postfix:
            text += ", " + " ".join(f"{k}={_short(v)}" for k, v in self.postfix.items())
        return text


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
