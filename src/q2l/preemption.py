"""Stop requests from the outside world: signals become a flag the training loop polls.

SIGTERM (schedulers, `kill`), SIGINT (Ctrl-C), SIGUSR1 (SLURM's `--signal=USR1@90`) and SIGUSR2
(submitit's preemption signal) only set a flag; the loop finishes the step it is in, saves a
checkpoint at that boundary and exits with `EXIT_PREEMPTED`, so the same command run again resumes
(`resume=auto`). Nothing is done inside the handler itself, so a second signal during the save can
do no harm.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType

from q2l import dist

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
EXIT_PREEMPTED = 75

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Installs the handlers on enter and restores the previous ones on exit.

    `requested` holds the name of the first signal received, or None.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for number in HANDLED_SIGNALS:
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread (some launchers): polling still works
                pass
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signal.Signals(number).name

    def __bool__(self) -> bool:
        return self.requested is not None


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` needs: JOBID, or ARRAYJOBID_TASKID for an array task."""
    array_job, array_task = (
        os.environ.get("SLURM_ARRAY_JOB_ID"),
        os.environ.get("SLURM_ARRAY_TASK_ID"),
    )
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue() -> None:
    """After a stop request was saved: have the scheduler run this job again, which resumes it.

    Under hydra-submitit-launcher, submitit's own SIGUSR1 handler (back in place once StopRequest
    exits) pickles the job and requeues it; it exits rank 0. A plain SLURM job is requeued with
    `scontrol requeue` by rank 0. Elsewhere nothing happens.
    """
    if "SUBMITIT_FOLDER" in os.environ:
        from submitit import JobEnvironment

        number = JobEnvironment._usr_sig()  # submitit's preemption signal (SIGUSR2 by default)
        handler = signal.getsignal(number)
        if callable(handler):
            handler(number, None)
        return
    if dist.is_main_process():
        requeue_slurm_job()


def requeue_slurm_job() -> bool:
    """Ask SLURM to requeue this job (call on rank 0 only); True when scontrol accepted it."""
    job_id = slurm_job_id()
    if job_id is None:
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job_id)
    return True
