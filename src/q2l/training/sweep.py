"""Sweeps (`python train.py -m ...`, `hparams_search=...`): one summary of every job at the sweep
root, and continuing a sweep that was interrupted.

The summary is a Hydra callback, so it works with every launcher (basic, submitit local and SLURM)
and sweeper (basic, Optuna). summary.csv and summary.md list every job of the sweep, those not
started yet included: one column per swept key, the job's status, its best monitored score and
epoch, and a failed job's error on one line; best first. They are rewritten after each job (a
SLURM job updates them from its own node) and when the sweep ends or is interrupted.

A sweep's folder is decided once, when it is submitted (conf/hydra/default.yaml, q2l.config), and
every job keeps its own directory `<sweep>/<job number>`. Running the same sweep again into the same
folder (`hydra.sweep.dir=<sweep>`; `python train.py -m hydra.sweep.dir=<sweep>` alone reuses its
saved arguments) continues it: finished jobs are left alone, interrupted ones resume from their
checkpoints (`resume=auto`), the rest run. A different sweep into that folder is refused.
"""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from q2l.training.rundir import add_overrides
from q2l.utils import dist
from q2l.utils.atomic import atomic_write

SAVED_SWEEP = "multirun.yaml"  # what Hydra's sweepers (and q2l's Optuna sweeper) save at the root
# Overrides that say where or how a sweep runs, not what it computes: never compared or reused.
_WHERE_KEYS = ("hydra.sweep.dir", "hydra.mode", "hydra.run.dir")


class SweepSummary(Callback):
    """Writes summary.csv and summary.md at the sweep root, and guards a continued sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_continuation(Path(config.hydra.sweep.dir), config)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # In a multi-process job (one DDP rank per SLURM task) only rank 0 reports.
        if config.hydra.mode == RunMode.MULTIRUN and dist.is_main_process():
            rows = write_sweep_summary(Path(config.hydra.sweep.dir))
            # Hydra's basic launcher raises a failed job's error once its jobs are done, and
            # on_multirun_end never runs: after the last job the summary is shown from here.
            if rows and all(row.status not in _UNFINISHED for row in rows):
                show_sweep_summary(Path(config.hydra.sweep.dir), rows)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        show_sweep_summary(
            Path(config.hydra.sweep.dir), write_sweep_summary(Path(config.hydra.sweep.dir))
        )


_UNFINISHED = ("not started", "running", "interrupted")
_SHOWN: set[str] = set()  # the sweeps whose summary this process printed


def show_sweep_summary(sweep_dir: Path, rows: list[JobRow]) -> None:
    """Print the summary once per sweep and process, in the process the user watches (not in a
    submitit job's, whose output goes to its log)."""
    if not rows or str(sweep_dir) in _SHOWN or "SUBMITIT_FOLDER" in os.environ:
        return
    _SHOWN.add(str(sweep_dir))
    print(f"sweep summary ({sweep_dir / 'summary.md'}):\n{to_markdown(rows)}", flush=True)


@dataclass
class JobRow:
    """One job of a sweep, as the summary lists it."""

    job: str
    overrides: dict[str, str]
    status: str  # completed, early_stopped, preempted, failed, running, interrupted, not started
    monitor: str = "mAP"
    best: float | None = None  # the monitored score (better of raw and EMA weights)
    best_mAP: float | None = None  # noqa: N815 (the metric's name)
    best_epoch: int | None = None
    weights: str | None = None  # "raw" or "ema": which scored best
    error: str | None = None
    run_dir: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def write_sweep_summary(sweep_dir: Path) -> list[JobRow]:
    """Write summary.csv and summary.md for every job of the sweep in `sweep_dir`; returns the rows.

    Jobs that end together under a parallel launcher each rewrite the files: a lock beside them
    keeps the writes in turn, and each file is replaced atomically.
    """
    rows = summarize_sweep(sweep_dir)
    if not rows:
        return rows
    sweep_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(sweep_dir / ".summary.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        rows = summarize_sweep(sweep_dir)  # what the jobs hold now, under the lock
        keys = swept_keys(rows)
        with atomic_write(sweep_dir / "summary.csv", "w") as handle:
            writer = csv.writer(handle)
            writer.writerow(_header(rows, keys))
            writer.writerows(_cells(row, keys) for row in rows)
        with atomic_write(sweep_dir / "summary.md", "w") as handle:
            handle.write(to_markdown(rows) + "\n")
    finally:
        os.close(fd)
    return rows


def summarize_sweep(sweep_dir: Path) -> list[JobRow]:
    """Every job of the sweep: those with a directory, and those the saved sweep plans that have
    none yet (status "not started"). Sorted best first, then jobs without a score by number."""
    rows = {}
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        rows[job_dir.name] = _job_row(job_dir, _parse(OmegaConf.load(overrides_file)))
    for number, overrides in enumerate(planned_jobs(sweep_dir) or []):
        if str(number) not in rows:
            rows[str(number)] = JobRow(
                job=str(number),
                overrides=_parse(overrides),
                status="not started",
                run_dir=str(sweep_dir / str(number)),
            )
    return sorted(rows.values(), key=_rank)


def _job_row(job_dir: Path, overrides: dict[str, str]) -> JobRow:
    row = JobRow(job=job_dir.name, overrides=overrides, status="", run_dir=str(job_dir))
    metrics_file = job_dir / "metrics.json"
    summary: dict[str, Any] = {}
    if metrics_file.is_file():
        try:
            summary = json.loads(metrics_file.read_text())
        except (OSError, ValueError) as error:
            summary = {"status": "failed", "error": f"unreadable metrics.json: {error}"}
    if summary:
        best = summary.get("best") or {}
        row.status = summary.get("status", "unknown")
        row.monitor = summary.get("monitor", "mAP")
        row.best, row.best_mAP = _number(best.get("value")), _number(best.get("mAP"))
        row.best_epoch = best.get("epoch") if best.get("epoch", -1) >= 0 else None
        row.weights, row.error = best.get("weights"), summary.get("error")
    elif not (job_dir / ".q2l-run").exists():
        row.status = "not started"
    else:
        row.status = "running" if _locked(job_dir / ".q2l.lock") else "interrupted"
    return row


def _number(value: Any) -> float | None:
    return (
        round(float(value), 3) if isinstance(value, (int, float)) and math.isfinite(value) else None
    )


def _locked(lock_file: Path) -> bool:
    """Whether a live process holds the run's lock (q2l.training.rundir): the job is running now."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _rank(row: JobRow) -> tuple:
    number = int(row.job) if row.job.isdigit() else 1 << 30
    return (row.best is None, -(row.best or 0.0), number, row.job)


def planned_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The jobs a grid sweep (Hydra's basic sweeper) saved in `sweep_dir` plans, in job order, as
    override lists; None for other sweepers (Optuna chooses its trials as it goes)."""
    saved = sweep_dir / SAVED_SWEEP
    if not saved.is_file():
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        config = OmegaConf.load(saved)
        if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None
        arguments = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        arguments += [str(o) for o in config.hydra.overrides.task]
        parsed = OverridesParser.create().parse_overrides(arguments)
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # a damaged or foreign multirun.yaml: list the jobs that ran, no more
        return None


def swept_keys(rows: list[JobRow]) -> list[str]:
    """The override keys whose values differ between jobs, in the order they were given."""
    keys: dict[str, set[str]] = {}
    for row in rows:
        for key, value in row.overrides.items():
            keys.setdefault(key, set()).add(value)
    varying = [key for key, values in keys.items() if len(values) > 1]
    missing = [k for k in keys if any(k not in row.overrides for row in rows) and k not in varying]
    return varying + missing


def common_overrides(rows: list[JobRow]) -> list[str]:
    """Overrides every job shares (the summary's heading), as they were typed."""
    keys = set(swept_keys(rows))
    first = rows[0].overrides if rows else {}
    return [_typed(k, v) for k, v in first.items() if k not in keys]


def _typed(key: str, value: str) -> str:
    """An override as typed: `key=value`, or `~key` for a deletion (stored as value `~`)."""
    return f"~{key}" if value == _DELETED else f"{key}={value}"


def _header(rows: list[JobRow], keys: list[str]) -> list[str]:
    monitor = rows[0].monitor if rows else "mAP"
    best = [f"best_{monitor}"] if monitor != "mAP" else []
    return ["job", *keys, "status", *best, "best_mAP", "best_epoch", "weights", "error", "run_dir"]


def _cells(row: JobRow, keys: list[str]) -> list[Any]:
    best = [row.best] if row.monitor != "mAP" else []
    cells = [row.job, *(row.overrides.get(k, "") for k in keys), row.status, *best, row.best_mAP]
    cells += [row.best_epoch, row.weights, _one_line(row.error), row.run_dir]
    return ["" if cell is None else cell for cell in cells]


def _one_line(text: str | None) -> str | None:
    """An error on one line (a table cell): its lines joined, the table's `|` escaped."""
    if not text:
        return text
    return " / ".join(line.strip() for line in str(text).splitlines() if line.strip())


def to_markdown(rows: list[JobRow]) -> str:
    """The summary as a Markdown table, with the overrides all jobs share above it."""
    keys = swept_keys(rows)
    header = _header(rows, keys)
    lines = []
    common = common_overrides(rows)
    if common:
        lines += [f"common overrides: `{' '.join(common)}`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(cell).replace("|", "\\|") for cell in _cells(row, keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_DELETED = "~"  # the value shown for `~key` (a deletion)


def _parse(overrides: Any) -> dict[str, str]:
    """{'optimizer.lr': '0.001'} from ['optimizer.lr=0.001']; hydra.* left out, `+` dropped,
    `~key` kept as the value `~`."""
    parsed = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        if key.startswith("~"):
            value = _DELETED
        key = key.lstrip("+~")
        if not key.startswith(("hydra.", "hydra/")):
            parsed[key] = value
    return parsed


def check_continuation(sweep_dir: Path, config: DictConfig) -> None:
    """Refuse to run a different sweep into a folder that holds one (its jobs' directories would be
    taken by other settings); the same sweep continues. Nothing is written before this check."""
    saved = sweep_dir / SAVED_SWEEP
    if not saved.is_file():
        return
    before = _arguments(OmegaConf.load(saved))
    now = _arguments(config)
    if before != now:
        changed = sorted(set(before) ^ set(now))
        raise ValueError(
            f"{sweep_dir} holds another sweep (arguments differ: {' '.join(changed)}); q2l does "
            "not run a different sweep into its job folders. Rerun it with its own arguments "
            f"(`python train.py -m hydra.sweep.dir={sweep_dir}` alone reuses them) or choose a "
            "new hydra.sweep.dir. Nothing was changed"
        )


def _arguments(config: DictConfig) -> list[str]:
    """A sweep's own arguments: its task overrides and what its hydra overrides choose (launcher,
    sweeper settings), leaving out where it runs."""
    task = [str(o) for o in config.hydra.overrides.task]
    hydra = [
        str(o)
        for o in config.hydra.overrides.hydra
        if not str(o).lstrip("+~").partition("=")[0].startswith(_WHERE_KEYS)
        # A sweep may continue on another launcher, and a search run longer.
        and not str(o).startswith(("hydra/launcher", "hydra.launcher", "hydra.sweeper.n_trials"))
    ]
    return sorted(task + hydra)


def with_saved_sweep_overrides(argv: list[str]) -> list[str]:
    """For `-m hydra.sweep.dir=X` (or any command naming a sweep folder that holds a saved sweep):
    X's saved arguments, then the command's own (which win), and `-m` if X was a `-m` sweep.

    So `python train.py -m hydra.sweep.dir=X` alone continues X as it was started. `argv`
    excludes the program name.
    """
    given = dict(arg.partition("=")[::2] for arg in argv if not arg.startswith("-"))
    sweep_dir = given.get("hydra.sweep.dir")
    saved_file = Path(sweep_dir).expanduser() / SAVED_SWEEP if sweep_dir else None
    if saved_file is None or not saved_file.is_file():
        return argv
    saved = OmegaConf.load(saved_file)
    names = {key.lstrip("+~") for key in given}
    kept, multirun = [], False
    for item in [*saved.hydra.overrides.hydra, *saved.hydra.overrides.task]:
        key = str(item).partition("=")[0].lstrip("+~")
        if key == "hydra.mode":
            multirun = str(item).endswith("MULTIRUN")
        elif key not in names and not key.startswith(_WHERE_KEYS):
            kept.append(str(item))
    flags = ["-m"] if multirun and not {"-m", "--multirun"} & set(argv) else []
    if kept:
        print(
            f"continuing sweep {sweep_dir} with its saved arguments: {' '.join(kept)}",
            file=sys.stderr,
        )
    return add_overrides(argv, kept, flags)
