"""Which backend run a run directory logs into, so that a resumed run continues it.

`logger_runs.json` in the run directory holds, per backend, the id of the run it opened and where
that run lives (MLflow: the tracking URI; W&B: entity/project). A resumed run (resume=auto, a
SLURM requeue) reads it and continues the same MLflow or W&B run instead of starting a new one.
Written whole or not at all (q2l.utils.atomic), by rank 0 only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from q2l.utils.atomic import atomic_write

log = logging.getLogger(__name__)

RUNS_FILE = "logger_runs.json"


@dataclass(frozen=True)
class BackendRun:
    """run_id: the backend's id of the run; location: where it lives (tracking URI, project)."""

    run_id: str
    location: str


def saved_run(run_dir: Path, backend: str) -> BackendRun | None:
    """The run `backend` opened for this run directory earlier, or None."""
    entry = _read(run_dir).get(backend)
    if not isinstance(entry, dict):
        return None
    try:
        return BackendRun(run_id=str(entry["run_id"]), location=str(entry["location"]))
    except KeyError:
        return None


def save_run(run_dir: Path, backend: str, run: BackendRun) -> None:
    """Remember `run` as `backend`'s run for this run directory."""
    entries = _read(run_dir)
    entries[backend] = asdict(run)
    with atomic_write(run_dir / RUNS_FILE, "w") as handle:
        json.dump(entries, handle, indent=2)
        handle.write("\n")


def _read(run_dir: Path) -> dict:
    path = run_dir / RUNS_FILE
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        # Unreadable: the backends start new runs rather than failing the training run.
        log.warning("%s unreadable (%s): loggers start new runs", path, error)
        return {}
    return entries if isinstance(entries, dict) else {}
