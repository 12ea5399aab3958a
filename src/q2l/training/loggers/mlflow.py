"""logger=mlflow: one MLflow run per q2l run, in any MLflow tracking store (pip install
'q2l[mlflow]', which installs mlflow-skinny and the SQLite store's SQLAlchemy and Alembic).

Params are the hyperparameters under their command-line names (loss=asl, optimizer.lr, ...);
metrics the shared names (q2l.training.loggers.base) at each optimizer step; tags the run
directory, status and the better weights. The run's id is kept in the run directory
(logger_runs.json), so a resumed run continues the same MLflow run; the run ends FINISHED,
KILLED (preempted: resume=auto continues it) or FAILED.

    python train.py experiment=demo logger=mlflow logger.mlflow.tracking_uri=sqlite:///mlflow.db
    mlflow ui --backend-store-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from q2l.training.loggers.backend_runs import BackendRun, save_run, saved_run
from q2l.training.loggers.base import STEP_LOSS, STEP_LR, RunLogger, RunOutcome, epoch_scalars
from q2l.training.loggers.hyperparameters import Hyperparameters, Value
from q2l.training.records import EpochRecord

log = logging.getLogger(__name__)

PARAMS_PER_CALL = 100  # MLflow's limit for one log_batch
METRICS_PER_CALL = 1000


class MLflowLogger(RunLogger):
    """An MLflow run, through MLflow's client (no global active run, so sweeps in one process
    keep their runs apart).

    Args:
        run_dir: the run directory; logger_runs.json there keeps the MLflow run's id.
        tracking_uri: where runs are kept: sqlite:///<file>.db, a server's http(s) URL or a
            folder (null: $MLFLOW_TRACKING_URI, else MLflow's default, sqlite:///mlflow.db in the
            working directory).
        experiment_name: the MLflow experiment the run goes into (created when missing).
        run_name: the run's name in MLflow (null: the run directory's name).
        tags: extra tags of the run.
    """

    name = "mlflow"
    package = "mlflow"
    extra = "mlflow"

    def __init__(
        self,
        run_dir: str | Path,
        tracking_uri: str | None = None,
        experiment_name: str = "q2l",
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name or self.run_dir.name
        self.tags = dict(tags or {})
        self.uri = ""  # the tracking URI in use (tracking_uri, or MLflow's own default)
        self.client = None
        self.run_id: str | None = None

    def start(self, hparams: Hyperparameters, history: Sequence[EpochRecord]) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        # Alembic logs each of the SQLite store's schema migrations at INFO: dozens of lines.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        uri = self.uri = _absolute(self.tracking_uri or mlflow.get_tracking_uri())
        self.client = MlflowClient(tracking_uri=uri)
        saved = saved_run(self.run_dir, self.name)
        self.run_id = self._continue(saved) if saved is not None else None
        if self.run_id is None:
            self.run_id = self._create()
            for record in history:  # a new MLflow run of a resumed q2l run holds its whole history
                self.log_epoch(record)
        save_run(self.run_dir, self.name, BackendRun(self.run_id, uri))
        self._log_params(hparams.flat())

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self._log_metrics({STEP_LOSS: loss, STEP_LR: lr}, step)

    def log_epoch(self, record: EpochRecord) -> None:
        self._log_metrics({"epoch": record.epoch, **epoch_scalars(record)}, record.step)

    def finish(self, outcome: RunOutcome | None) -> None:
        if outcome is not None:
            self._log_metrics(outcome.scalars, int(outcome.scalars.get("steps", 0)))
            self.client.set_tag(self.run_id, "q2l.status", outcome.status)
            if outcome.weights is not None:
                self.client.set_tag(self.run_id, "q2l.best_weights", outcome.weights)
        status = "FAILED" if outcome is None else "FINISHED" if outcome.succeeded else "KILLED"
        self.client.set_terminated(self.run_id, status=status)

    def _continue(self, saved: BackendRun) -> str | None:
        """The saved run's id, marked running again; None when it is not in this store."""
        from mlflow.exceptions import MlflowException

        if saved.location != self.uri:
            log.warning(
                "this run's MLflow run %s is in %s, not %s: starting a new MLflow run",
                saved.run_id,
                saved.location,
                self.uri,
            )
            return None
        try:
            self.client.get_run(saved.run_id)
        except MlflowException as error:
            log.warning("MLflow run %s not found (%s): starting a new one", saved.run_id, error)
            return None
        self.client.update_run(saved.run_id, status="RUNNING")
        log.info("MLflow: continuing run %s in %s", saved.run_id, self.uri)
        return saved.run_id

    def _create(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=_artifact_location(self.uri)
                )
            except MlflowException:  # another job of a sweep created it first
                experiment_id = self.client.get_experiment_by_name(
                    self.experiment_name
                ).experiment_id
        tags = {"q2l.run_dir": str(self.run_dir.resolve()), **self.tags}
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        log.info("MLflow: new run %s (%s) in %s", run.info.run_id, self.run_name, self.uri)
        return run.info.run_id

    def _log_params(self, values: dict[str, Value]) -> None:
        """Params the run does not hold yet; MLflow keeps a param's first value, so a value
        changed on resume (allow_config_change) is named in a warning instead."""
        from mlflow.entities import Param

        held = self.client.get_run(self.run_id).data.params
        changed = {k: v for k, v in values.items() if k in held and held[k] != str(v)}
        if changed:
            log.warning(
                "MLflow keeps a param's first value; changed on resume and not updated there: %s",
                ", ".join(f"{k}={held[k]} -> {v}" for k, v in changed.items()),
            )
        new = [Param(key, str(value)) for key, value in values.items() if key not in held]
        for first in range(0, len(new), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=new[first : first + PARAMS_PER_CALL])

    def _log_metrics(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in scalars.items()]
        for first in range(0, len(metrics), METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[first : first + METRICS_PER_CALL])


def _absolute(uri: str) -> str:
    """A SQLite URI with an absolute path (its folder created), so that logger_runs.json names
    one store (a relative URI from another working directory is another store); other URIs as
    they are."""
    if not uri.startswith("sqlite:///"):
        return uri
    path = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _artifact_location(uri: str) -> str | None:
    """A new experiment's artifact folder: beside a SQLite store's file (MLflow's own default is
    ./mlruns in whatever the working directory is); the store's choice for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).with_name("mlartifacts").as_uri()
