"""`hydra/sweeper=q2l_optuna`: an Optuna search that keeps every trial through failures and stops.

Optuna (the engine: samplers, study storage) chooses the trials; Hydra's launcher (basic, or
submitit on a local machine or SLURM) runs them; this sweeper is the glue between the two, with
the search space written in Hydra's sweep syntax (`interval(0, 0.1)`, `tag(log, interval(1e-4,
3e-3))`, `range(0, 6)`, `choice(a, b)`), as in hydra-optuna-sweeper. What it does differently:

- a trial that fails is recorded as failed (its error in the trial's user attribute `error`, and
  in the sweep summary) and the search goes on (`max_failure_rate`, default 1.0);
- the study is kept in a real database: `storage` (any Optuna storage URL) or, by default, SQLite
  in the sweep folder (`<sweep>/optuna.db`); the sweep's arguments go to `<sweep>/multirun.yaml`;
- run again into the same sweep folder, the search continues: trials that finished are kept,
  trials that were running when it stopped run again in their own job folder (each job folder is
  named after its trial's number, so `resume=auto` continues it from its checkpoint), and new
  trials are asked until `n_trials` have finished in all.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module without
# registering it in sys.modules, where dataclasses look string annotations up.
import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any  # noqa: UP035 (OmegaConf's structured types)

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

STUDY_FILE = "optuna.db"


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.q2l_sweepers.optuna_sweeper.OptunaSweeper"
    # An Optuna sampler (`_partial_: true` for GridSampler, which is given the grid).
    sampler: Any = field(
        default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None}
    )
    direction: str = "maximize"  # the objective is the trial's best val score
    storage: str | None = None  # None: sqlite:///<sweep>/optuna.db
    study_name: str = "q2l"
    n_trials: int = 20  # trials finished in all, counting those of earlier runs of the search
    n_jobs: int = 1  # trials launched together (in parallel under hydra/launcher=local|slurm)
    # Share of a batch of trials that may fail before the search stops; 1.0: never stop.
    max_failure_rate: float = 1.0
    params: dict[str, Any] | None = None  # key: Hydra sweep expression (or a fixed value)


ConfigStore.instance().store(
    group="hydra/sweeper", name="q2l_optuna", node=OptunaSweeperConf, provider="q2l"
)


class OptunaSweeper(Sweeper):
    """Optuna's ask-and-tell over Hydra's launcher, each trial in job folder `<sweep>/<number>`."""

    def __init__(
        self,
        sampler: Any,
        direction: str,
        storage: str | None,
        study_name: str,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
    ) -> None:
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"hydra.sweeper.direction={direction!r}: maximize or minimize")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError(f"hydra.sweeper.max_failure_rate={max_failure_rate}: in [0, 1]")
        self.sampler, self.direction, self.storage = sampler, direction, storage
        self.study_name, self.n_trials, self.n_jobs = study_name, n_trials, max(n_jobs, 1)
        self.max_failure_rate = max_failure_rate
        self.params = OmegaConf.to_container(params) if params else {}
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # what a continuation reuses
        distributions, fixed = search_space(
            [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        )
        sampler = self.sampler
        if isinstance(sampler, functools.partial):  # GridSampler: built on the grid
            grid = {name: _grid(d) for name, d in distributions.items()}
            sampler = sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        storage = self.storage or f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            sampler=sampler,
            direction=self.direction,
            load_if_exists=True,
        )
        done = [t for t in study.trials if t.state.is_finished()]
        stale = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
        remaining = max(self.n_trials - len(done) - len(stale), 0)
        log.info(
            "study %r in %s: %d trials finished, %d interrupted (run again in their folders), "
            "%d new to run",
            study.study_name,
            storage,
            len(done),
            len(stale),
            remaining,
        )
        for frozen in stale:  # each keeps its number, so its job folder and checkpoints
            self._run(study, [optuna.trial.Trial(study, frozen._trial_id)], fixed)
        while remaining > 0:
            batch = [study.ask(distributions) for _ in range(min(self.n_jobs, remaining))]
            self._run(study, batch, fixed)
            remaining -= len(batch)
        _write_results(study, sweep_dir)

    def _run(self, study: Any, trials: list, fixed: dict[str, str]) -> None:
        """Launch `trials` together, each into the job folder of its number, and tell Optuna how
        each ended; raise when more failed than max_failure_rate allows."""
        import optuna

        numbers = [trial.number for trial in trials]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            # The launcher numbers a batch's jobs from its first; others go one by one.
            for trial in trials:
                self._run(study, [trial], fixed)
            return
        overrides = [
            [f"{k}={v}" for k, v in fixed.items()] + [f"{k}={v}" for k, v in t.params.items()]
            for t in trials
        ]
        results = self.launcher.launch(overrides, initial_job_idx=numbers[0])
        failures = []
        for trial, result in zip(trials, results, strict=True):
            try:
                value = float(result.return_value)  # raises the trial's own error if it failed
                if not math.isfinite(value):
                    raise ValueError(f"the trial's objective is {value}")
            except Exception as error:
                reason = f"{type(error).__name__}: {error}".strip().splitlines()[0]
                trial.set_user_attr("error", reason)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                log.warning("trial %d failed (the search goes on): %s", trial.number, reason)
                failures.append(reason)
                continue
            study.tell(trial, value)
        if len(failures) / len(trials) > self.max_failure_rate:
            raise RuntimeError(
                f"{len(failures)} of {len(trials)} trials failed, more than "
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: {failures[0]}"
            )


def search_space(arguments: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Optuna distributions for the sweep expressions in `arguments` (`key=interval(...)`, ...)
    and the fixed `key=value` overrides every trial gets; a later argument wins for its key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    distributions: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        distributions.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            distributions[key] = _distribution(key, override)
        else:
            fixed[key] = override.get_value_element_as_str()
    return distributions, fixed


def _distribution(key: str, override: Any) -> Any:
    """One sweep expression as an Optuna distribution."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    value = override.value()
    log_scale = "log" in (getattr(value, "tags", None) or ())
    if override.is_interval_sweep():
        if isinstance(value.start, int) and isinstance(value.end, int) and not log_scale:
            return IntDistribution(value.start, value.end)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in values) and values:
            step = int(value.step)
            return IntDistribution(values[0], values[-1], step=step, log=log_scale)
        return CategoricalDistribution(values)
    if override.is_choice_sweep():
        return CategoricalDistribution(list(override.sweep_iterator()))
    raise ValueError(f"{key}: the sweep expression {override.input_line!r} is not supported")


def _grid(distribution: Any) -> list:
    """The values a grid sampler walks for one distribution."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution):
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    raise ValueError("a grid search takes choice() and range() parameters, not interval()")


def _write_results(study: Any, sweep_dir: Path) -> None:
    """optimization_results.yaml (best value and parameters); an error when no trial completed."""
    import optuna

    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise RuntimeError(
            f"no trial of the search completed ({len(study.trials)} failed or stopped): see "
            f"{sweep_dir / 'summary.md'} for each trial's error"
        )
    best = study.best_trial
    results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
    log.info("best trial %d: value %s, parameters %s", best.number, best.value, best.params)
    OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
