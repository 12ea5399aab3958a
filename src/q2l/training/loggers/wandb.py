"""logger=wandb: one Weights & Biases run per q2l run (pip install 'q2l[wandb]').

The config is the hyperparameters under their command-line names (loss=asl, optimizer.lr, ...);
the history the shared names (q2l.training.loggers.base) against the optimizer step (`step`, set
as every metric's x axis, so a resumed run's points land where they belong); the summary the best
and final epochs. The run's files go into `<run dir>/wandb/`, and its id into logger_runs.json,
so a resumed run continues the same W&B run (online; offline, the resumed part is a second
offline folder with the same run id, which `wandb sync` uploads into that run).

    python train.py experiment=demo logger=wandb logger.wandb.project=kitchen
    python train.py experiment=demo logger=wandb logger.wandb.mode=offline   # no account needed
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import Path

from q2l.training.loggers.backend_runs import BackendRun, save_run, saved_run
from q2l.training.loggers.base import STEP_LOSS, STEP_LR, RunLogger, RunOutcome, epoch_scalars
from q2l.training.loggers.hyperparameters import Hyperparameters
from q2l.training.records import EpochRecord
from q2l.utils.optional_imports import allow_import

STEP = "step"  # every metric's x axis: the optimizer step


class WandbMode(str, Enum):
    online = "online"  # syncs as it runs (wandb login or WANDB_API_KEY)
    offline = "offline"  # files only, in <run dir>/wandb/; `wandb sync` uploads them later
    disabled = "disabled"  # W&B does nothing


class WandbLogger(RunLogger):
    """A W&B run.

    Args:
        run_dir: the run directory; W&B's files go into its wandb/ folder, the run's id into
            logger_runs.json.
        project: the W&B project.
        entity: the W&B team or user (null: the account's default).
        mode: online, offline or disabled (null: $WANDB_MODE, else online).
        run_name: the run's name in W&B (null: the run directory's name).
        group: groups runs in the W&B UI (e.g. a sweep's jobs).
        tags: tags of the run.
    """

    name = "wandb"
    package = "wandb"
    extra = "wandb"

    def __init__(
        self,
        run_dir: str | Path,
        project: str = "q2l",
        entity: str | None = None,
        mode: WandbMode | None = None,
        run_name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.project, self.entity = project, entity
        self.mode = getattr(mode, "value", mode)  # an Enum member when built from a typed config
        self.run_name = run_name or self.run_dir.name
        self.group = group
        self.tags = list(tags or [])
        self.run = None

    def start(self, hparams: Hyperparameters, history: Sequence[EpochRecord]) -> None:
        allow_import("wandb")
        import wandb

        location = f"{self.entity or ''}/{self.project}"
        saved = saved_run(self.run_dir, self.name)
        continuing = saved is not None and saved.location == location
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            dir=str(self.run_dir),
            id=saved.run_id if continuing else None,  # None: W&B makes a new id
            name=self.run_name,
            group=self.group,
            tags=self.tags,
            resume="allow",
            # A new run per call: a sweep's jobs in one process must not share one.
            reinit="create_new",
        )
        save_run(self.run_dir, self.name, BackendRun(self.run.id, location))
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)
        self.run.config.update(hparams.flat(), allow_val_change=True)
        if not continuing:
            for record in history:  # a new W&B run of a resumed q2l run holds its whole history
                self.log_epoch(record)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self.run.log({STEP: step, STEP_LOSS: loss, STEP_LR: lr})

    def log_epoch(self, record: EpochRecord) -> None:
        self.run.log({STEP: record.step, "epoch": record.epoch, **epoch_scalars(record)})

    def finish(self, outcome: RunOutcome | None) -> None:
        if outcome is not None:
            self.run.summary.update(
                {"status": outcome.status, "best/weights": outcome.weights, **outcome.scalars}
            )
            if not outcome.succeeded:
                self.run.mark_preempting()  # shown as preempted; resume=auto continues it
        self.run.finish(exit_code=0 if outcome is not None else 1)
