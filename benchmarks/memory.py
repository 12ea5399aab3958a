"""Real training runs in a subprocess: resident memory per epoch, and the demo's time to its mAP.

Both run `python train.py experiment=demo` from the repository root, as `make train` does, with
every output (run directory, generated data, pretrained demo backbone, label cache) in a temporary
folder, so the demo builds its data and pretrains its backbone from scratch. Memory is read from
/proc (Linux) while the run goes on; an epoch's figure is the resident set size when its line
appears in the run's metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.timing import Row

REPOSITORY = Path(__file__).resolve().parents[1]
DEMO_TIME_TARGET_S = 120.0  # `make train` from nothing to its best checkpoint, on 2 quiet cores
DEMO_MAP_TARGET = 95.0  # best val mAP of that run
FLAT_TOLERANCE = 0.05  # resident memory may grow 5% from the second epoch to the last


@dataclass
class TrainingRun:
    """What one subprocess training run measured."""

    wall_time_s: float
    returncode: int
    epoch_rss_mb: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    summary: dict = field(default_factory=dict)
    output_tail: str = ""


def run_training(
    overrides: list[str], poll_s: float = 0.05, threads: int | None = -1
) -> TrainingRun:
    """`python train.py experiment=demo` with `overrides`; run directory, data and caches in a
    temporary folder. threads: OMP_NUM_THREADS for the run; -1 the benchmark's own intra-op
    thread count; None none, so that the CLI chooses (q2l.utils.threads) as it does for
    `make train`."""
    with tempfile.TemporaryDirectory(prefix="q2l-bench-train-") as folder:
        root = Path(folder)
        run_dir = root / "run"
        command = [
            sys.executable,
            "train.py",
            "experiment=demo",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ]
        # The configs put generated data and caches under these, so nothing lands in the checkout.
        environment = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "Q2L_DATA_DIR": str(root / "data"),
            "Q2L_CACHE_DIR": str(root / "cache"),
        }
        if threads is not None:
            environment["OMP_NUM_THREADS"] = str(
                torch.get_num_threads() if threads < 0 else threads
            )
        start = time.perf_counter()
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPOSITORY,
            env=environment,
            text=True,
        )
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
        reader.start()
        run = TrainingRun(wall_time_s=0.0, returncode=0)
        epochs_seen = 0
        while process.poll() is None:
            status = _proc_status(process.pid)
            run.peak_rss_mb = max(run.peak_rss_mb, status.get("VmHWM", 0.0))
            epochs = _count_lines(run_dir / "metrics.jsonl")
            if epochs > epochs_seen:
                run.epoch_rss_mb += [status.get("VmRSS", 0.0)] * (epochs - epochs_seen)
                epochs_seen = epochs
            time.sleep(poll_s)
        run.wall_time_s = time.perf_counter() - start
        run.returncode = process.returncode
        reader.join()
        run.output_tail = "".join(output[-20:])
        summary_file = run_dir / "metrics.json"
        if summary_file.is_file():
            run.summary = json.loads(summary_file.read_text())
    if run.returncode != 0:
        raise RuntimeError(f"training subprocess failed ({run.returncode}):\n{run.output_tail}")
    return run


def measure_memory(epochs: int, num_train: int, num_val: int) -> list[Row]:
    """Section d: peak resident memory of a shrunk demo run, and its growth across epochs."""
    run = run_training(
        [
            f"trainer.epochs={epochs}",
            f"prepare.data.num_train={num_train}",
            f"prepare.data.num_val={num_val}",
            # Random backbone weights: memory does not depend on them, and pretraining takes time.
            "backbone.pretrained=false",
            "~prepare.backbone",
            "backbone.weights=null",
        ]
    )
    rss = run.epoch_rss_mb
    per_epoch = " ".join(f"{value:.0f}" for value in rss)
    rows = [
        Row(
            "d. memory",
            f"demo, {epochs} epochs of {num_train} images: peak RSS",
            run.peak_rss_mb,
            None,
            "MB",
            note=f"RSS after each epoch (MB): {per_epoch}",
        )
    ]
    if len(rss) >= 3:
        # The first epoch pays one-time allocations (allocator pools, first evaluation).
        rows.append(
            Row(
                "d. memory",
                f"RSS after epoch {len(rss)} vs after epoch 2",
                rss[-1],
                rss[1],
                "MB",
                "RSS after epoch 2",
                target=1.0 - FLAT_TOLERANCE,
                lower_is_better=True,
                note=f"growth {rss[-1] - rss[1]:+.0f} MB; target: within {FLAT_TOLERANCE:.0%}",
            )
        )
    return rows


def measure_demo_run() -> list[Row]:
    """`make train` as shipped (the demo config, the CLI's own thread choice): wall time start to
    finish, and its best mAP."""
    load = os.getloadavg()[0]
    run = run_training([], threads=None)
    best_map = float(run.summary.get("best", {}).get("mAP", float("nan")))
    return [
        Row(
            "f. demo run",
            "make train: wall time, start to finish",
            run.wall_time_s,
            DEMO_TIME_TARGET_S,
            "s",
            f"{DEMO_TIME_TARGET_S:.0f} s budget",
            target=1.0,
            lower_is_better=True,
            note=(
                "from nothing: generates the data and pretrains the demo backbone first; "
                f"the CLI's own thread choice; 1-min load average at the start {load:.1f}"
            ),
        ),
        Row(
            "f. demo run",
            "make train: best val mAP",
            best_map,
            DEMO_MAP_TARGET,
            "mAP",
            f"mAP target {DEMO_MAP_TARGET:.0f}",
            target=1.0,
        ),
    ]


def _proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of `pid` in MB; empty where /proc is unavailable."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = float(rest.split()[0]) / 1024.0  # kB -> MB
    except OSError:
        pass
    return values


def _count_lines(path: Path) -> int:
    try:
        with open(path) as lines:
            return sum(1 for line in lines if line.strip())
    except OSError:
        return 0
