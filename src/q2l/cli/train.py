"""`python train.py` / `q2l-train` / `torchrun ... train.py`: train one run, or a sweep (`-m`).

python train.py experiment=demo                  # the demo: Q2L on embedded handwriting data
python train.py backbone=tresnet_l dataset=coco2014 dataset.root=/data/coco backbone.weights=...
python train.py -m experiment=demo loss.gamma_neg=1,2,4   # a sweep, one run directory per job
"""

from __future__ import annotations

import datetime
import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from q2l.cli.help import command_help, help_topic
from q2l.cli.reporting import run_command
from q2l.config import CONFIG_DIR
from q2l.training.preemption import EXIT_PREEMPTED, StopRequest, StopRequested, requeue
from q2l.training.run import train
from q2l.training.rundir import set_run_time, with_saved_overrides
from q2l.training.sweep import (
    show_sweep_summary,
    with_saved_sweep_overrides,
    write_sweep_summary,
)
from q2l.utils import dist
from q2l.utils.allocator import configure_malloc
from q2l.utils.threads import configure_threads

log = logging.getLogger("q2l.train")


def main() -> None:
    """The command line. `resume=auto hydra.run.dir=X` reuses X's saved overrides, and
    `-m hydra.sweep.dir=X` a sweep's (continuing it). Under torchrun the processes join the
    process group before Hydra starts, and rank 0's start time names the one run directory they
    all use."""
    topic = help_topic(sys.argv[1:])
    if topic is not None:
        print(command_help("train", topic))
        return
    global _GIVEN_RUN_DIR
    given = [arg.partition("=")[2] for arg in sys.argv[1:] if arg.startswith("hydra.run.dir=")]
    if given and Path(given[-1]).expanduser().is_dir():
        _GIVEN_RUN_DIR = sorted(Path(given[-1]).expanduser().iterdir())
    stop = _stop_request()
    try:
        argv = with_saved_sweep_overrides(with_saved_overrides(sys.argv[1:]))
        if dist.launched_by_torchrun():
            if {"-m", "--multirun"} & set(argv):
                sys.exit(
                    "q2l: a sweep (-m) cannot run inside torchrun; sweep with hydra/launcher=slurm "
                    "(one DDP job per sweep point), or run torchrun once per setting"
                )
            dist.init()
            set_run_time(dist.broadcast(datetime.datetime.now()))
        sys.argv[1:] = argv
        _hydra_main()
    except StopRequested as stopped:
        log.warning("%s received before training started: stopping, nothing to save yet", stopped)
        sys.exit(EXIT_PREEMPTED)
    finally:
        stop.immediate = False
        dist.destroy()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    """Run one training job; returns its best mAP (what sweepers optimise).

    A job stopped by a signal (during start-up, training, or before it began: a sweep whose
    process was asked to stop) ends the process with EXIT_PREEMPTED, after the sweep summary is
    brought up to date and, under SLURM, the job requeued.
    """
    stop = _stop_request()
    stop.immediate = False  # each part of the job chooses (q2l.training.preemption)
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    try:
        with stop.immediately():  # joining the process group waits for the other tasks
            dist.init()  # the tasks of a SLURM job join here; torchrun's processes did in main()
        dist.quiet_other_ranks()  # after Hydra set up logging
        configure_threads(cfg.dataset.num_workers, adapt=not cfg.trainer.deterministic)
        configure_malloc(keep_freed=True)  # no page faults for what each step allocates again
        summary = run_command("q2l-train", train, cfg, run_dir, hydra_config, stop, logged=True)
    except StopRequested:
        summary = {"status": "preempted"}
        _discard_failed_start(run_dir, hydra_config, cfg)
    except BaseException:
        _discard_failed_start(run_dir, hydra_config, cfg)
        raise
    if summary["status"] == "preempted":
        _end_preempted(cfg, hydra_config, stop)
    return summary["best"]["value"]


_STOP: StopRequest | None = None
# What hydra.run.dir=X held before this process (None: not given, or not there yet).
_GIVEN_RUN_DIR: list[Path] | None = None


def _discard_failed_start(run_dir: Path, hydra_config: DictConfig, cfg: DictConfig) -> None:
    """A single run refused or failed before it saved anything: remove what this process made for
    it, so failed starts leave nothing behind. A run directory it created goes (and its date folder,
    when that is now empty); a `hydra.run.dir` that was there empty is emptied again.

    Kept: a sweep's job directories (the summary lists their errors), a run that saved a
    checkpoint, a `hydra.run.dir` that held anything before, and the output root itself.
    """
    if hydra_config.mode != RunMode.RUN or not dist.is_main_process():
        return
    if not run_dir.is_dir() or any(run_dir.glob("checkpoints/*.pt")):
        return
    if _GIVEN_RUN_DIR is not None:
        if not _GIVEN_RUN_DIR:  # it was empty: all it holds now is this start's
            for entry in run_dir.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        return
    root = Path(cfg.paths.output_dir).expanduser().resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("removed %s: the run saved nothing", run_dir)
    parent = run_dir.resolve().parent
    if parent != root and parent.is_relative_to(root) and not any(parent.iterdir()):
        parent.rmdir()


def _stop_request() -> StopRequest:
    """The process's stop request, installed on first use and kept for the process's life (a
    sweep's jobs share it: a stop during one job also stops the sweep). It starts immediate: a
    signal before the first job reaches its training loop ends the command at once."""
    global _STOP
    if _STOP is None:
        _STOP = StopRequest(immediate=True).__enter__()
    return _STOP


def _end_preempted(cfg: DictConfig, hydra_config: DictConfig, stop: StopRequest) -> None:
    """Exit with EXIT_PREEMPTED, the sweep summary (in a sweep) up to date, requeued if asked."""
    if hydra_config.mode == RunMode.MULTIRUN and dist.is_main_process():
        # The launcher never reaches its end of sweep: the summary is written now, listing the
        # jobs not run yet too. Rerunning with hydra.sweep.dir=<this sweep> continues it.
        sweep_dir = Path(hydra_config.sweep.dir)
        show_sweep_summary(sweep_dir, write_sweep_summary(sweep_dir))
    if cfg.trainer.slurm_requeue:
        requeue(stop)
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    main()
