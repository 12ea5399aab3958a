"""Prediction files: one row per image, streamed, never replacing an existing file.

Rows go to a hidden `.<name>.<pid>.partial` file beside the output as they are computed (a long
job that dies keeps what it wrote there) and become the output by a hard link at the end, which
fails instead of replacing a file that appeared meanwhile.

- `.jsonl`: {"path": ..., "labels": [names at or above their threshold], "scores": {name: p}}
- `.csv`: columns path, labels (names joined by "|"), then one score column per class.

Both files are UTF-8. A path whose name is not UTF-8 (PEP 383 surrogates in Python) is written
exactly in JSONL, as JSON's `\\udcff` escape, from which `os.fsencode(json.loads(line)["path"])`
gives back its bytes; in CSV each of its undecodable bytes is written as `\\xNN`
(q2l.utils.printable), which the log says once.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

from q2l.utils.atomic import link_new
from q2l.utils.errors import ConfigError
from q2l.utils.printable import is_printable, printable

log = logging.getLogger(__name__)

FORMATS = (".jsonl", ".csv")


def check_output(output: str | Path) -> Path:
    """`output` as a Path, refused before any work if it exists or has an unknown format."""
    path = Path(output).expanduser()
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"output={output}: the name must end in {' or '.join(FORMATS)}")
    if path.exists():
        raise FileExistsError(f"output={output} exists; q2l does not overwrite it. Pass a new name")
    if path.parent.exists() and not os.access(path.parent, os.W_OK):
        raise PermissionError(f"output={output}: folder {path.parent} is not writable")
    return path


class PredictionWriter:
    """Streams prediction rows for `class_names` into `output` (checked by `check_output`)."""

    def __init__(self, output: Path, class_names: list[str]) -> None:
        self.output = output
        self.class_names = class_names
        self.csv = output.suffix.lower() == ".csv"
        output.parent.mkdir(parents=True, exist_ok=True)
        self.partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
        self.handle = self.partial.open("w", encoding="utf-8", newline="" if self.csv else None)
        self.rows = 0
        self.escaped_paths = 0  # CSV rows whose path had bytes that are not UTF-8
        if self.csv:
            self.table = csv.writer(self.handle)
            self.table.writerow(["path", "labels", *class_names])

    def write(self, path: str, scores: list[float], labels: list[str]) -> None:
        if self.csv:
            if not is_printable(path):
                self._note_escaped(path)
                path = printable(path)
            self.table.writerow([path, "|".join(labels), *(repr(s) for s in scores)])
        else:  # json.dumps writes a surrogate as an ASCII escape, keeping the name exact
            row = {
                "path": path,
                "labels": labels,
                "scores": dict(zip(self.class_names, scores, strict=True)),
            }
            self.handle.write(json.dumps(row) + "\n")
        self.rows += 1

    def _note_escaped(self, path: str) -> None:
        if not self.escaped_paths:
            log.warning(
                "%s: image paths that are not valid UTF-8 (first: %s) are written with each "
                "undecodable byte as \\xNN, so the CSV stays UTF-8; a .jsonl output keeps them "
                "exactly (os.fsencode of the JSON string gives the bytes back)",
                self.output,
                printable(path),
            )
        self.escaped_paths += 1

    def close(self) -> Path:
        """Publish the rows as `output`; raises FileExistsError (keeping the rows) if it exists."""
        self.handle.close()
        link_new(
            self.partial,
            self.output,
            f"{self.output} appeared while predicting; the predictions are kept in {self.partial}",
        )
        return self.output
