"""Sweep summary: after `python train.py -m ...`, one row per job at the sweep root.

A Hydra callback, so it works with any launcher that returns to the driver process (basic, joblib,
submitit). Jobs that crashed have no metrics.json and are listed as failed, not dropped.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from q2l import dist
from q2l.atomic import atomic_write

COLUMNS = ["job", "overrides", "status", "best_mAP", "best_epoch", "weights", "run_dir", "error"]


class SweepSummary(Callback):
    """Writes summary.csv and summary.md in the sweep directory and prints the table.

    Rewritten after every job, not only at the end: Hydra's basic launcher re-raises a failed
    job's exception once the sweep finishes, and `on_multirun_end` then never runs.
    """

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # In a multi-process job (one DDP rank per SLURM task) only rank 0 reports.
        if config.hydra.mode == RunMode.MULTIRUN and dist.is_main_process():
            _report(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _report(Path(config.hydra.sweep.dir))


def _report(sweep_dir: Path) -> None:
    """Write the summary files and print the table so far."""
    rows = summarize_sweep(sweep_dir)
    if rows:
        write_summary(rows, sweep_dir)
        print(f"sweep summary ({sweep_dir / 'summary.md'}):\n{to_markdown(rows)}", flush=True)


def summarize_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory (those holding .hydra/overrides.yaml), in job order."""
    rows = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=_job_order):
        job_dir = overrides_file.parent.parent
        overrides = OmegaConf.load(overrides_file)
        row: dict[str, Any] = {
            "job": job_dir.name,
            "overrides": " ".join(str(o) for o in overrides),
            "status": "failed",
            "best_mAP": None,
            "best_epoch": None,
            "weights": None,
            "run_dir": str(job_dir),
            "error": None,
        }
        metrics_file = job_dir / "metrics.json"
        if metrics_file.is_file():
            summary = json.loads(metrics_file.read_text())
            best = summary.get("best") or {}
            mean_ap = best.get("mAP")
            row.update(
                status=summary.get("status", "unknown"),
                best_epoch=best.get("epoch"),
                best_mAP=round(mean_ap, 3) if mean_ap is not None else None,
                weights=best.get("weights"),
                error=summary.get("error"),
            )
        rows.append(row)
    return rows


def write_summary(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    """summary.csv and summary.md side by side, each written atomically (jobs that end together
    under a parallel launcher each rewrite them)."""
    with atomic_write(sweep_dir / "summary.csv", "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(sweep_dir / "summary.md", "w") as handle:
        handle.write(to_markdown(rows) + "\n")


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append(
            "| " + " | ".join("" if row[c] is None else str(row[c]) for c in COLUMNS) + " |"
        )
    return "\n".join(lines)


def _job_order(path: Path) -> tuple[int, str]:
    name = path.parent.parent.name
    return (int(name), name) if name.isdigit() else (1 << 30, name)
