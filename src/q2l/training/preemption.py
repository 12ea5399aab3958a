"""Stop requests from the outside world, at any moment of a command: start-up, training, between
the jobs of a sweep.

SIGTERM (schedulers, `kill`), SIGINT (Ctrl-C), SIGUSR1 (SLURM's `--signal=USR1@120`) and SIGUSR2
(submitit's preemption signal) end the command with `EXIT_PREEMPTED`, having kept everything it
had saved, so the same command run again continues (`resume=auto`). How soon depends on what the
process is doing when the signal arrives:

- while training (`StopRequest.deferred()`), the handler only sets a flag: the loop finishes the
  step it is in, saves a checkpoint at that boundary and returns "preempted". A second signal
  during the save does nothing.
- elsewhere (start-up: data check, demo build, model build, checkpoint load; and between the jobs
  of a sweep) nothing is in flight that a checkpoint could keep, and every file q2l writes there is
  written atomically, so the handler raises `StopRequested` at once, from wherever the process is.

Under several processes only the main process's own start-up work is interrupted at once (the
others wait for it in a collective, q2l.utils.dist.on_main); every other start-up stop is taken by
all processes together at the next milestone (`StopRequest.check`), so none is left waiting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
EXIT_PREEMPTED = 75

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopRequested(BaseException):  # noqa: N818 (a control-flow signal, like KeyboardInterrupt)
    """A stop signal arrived outside the training loop; the command ends with EXIT_PREEMPTED.

    A BaseException, as KeyboardInterrupt is: code that handles `Exception` (a failing sweep job,
    a start-up check) must not take a stop request for an error and carry on.
    """


class StopRequest:
    """The process's stop-signal handlers, installed on enter and restored on exit.

    `requested` holds the name of the first signal received, or None; `bool(stop)` says whether
    one was. `immediate`: the handler raises StopRequested (outside the training loop) instead of
    only setting the flag.
    """

    def __init__(self, immediate: bool = False) -> None:
        self.requested: str | None = None
        self.immediate = immediate
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
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            return  # raise once: a second signal must not interrupt the unwinding of the first
        self.requested = signal.Signals(number).name
        if self.immediate:
            raise StopRequested(self.requested)

    def __bool__(self) -> bool:
        return self.requested is not None

    @contextlib.contextmanager
    def deferred(self) -> Iterator[StopRequest]:
        """Inside: signals only set the flag (the training loop polls it at step boundaries)."""
        before, self.immediate = self.immediate, False
        try:
            yield self
        finally:
            self.immediate = before

    @contextlib.contextmanager
    def immediately(self) -> Iterator[StopRequest]:
        """Inside: a signal (or one already received) raises StopRequested at once."""
        self.raise_if_requested()
        before, self.immediate = self.immediate, True
        try:
            yield self
        finally:
            self.immediate = before

    def raise_if_requested(self) -> None:
        if self.requested is not None:
            raise StopRequested(self.requested)

    def check(self) -> None:
        """A start-up milestone: raise StopRequested on every process when any received a stop
        signal (one all-reduce under several processes, nothing otherwise)."""
        from q2l.utils import dist

        if dist.any_rank(bool(self)):
            raise StopRequested(self.requested or "a stop signal on another process")

    def previous_handler(self, number: int) -> object:
        """The handler this StopRequest replaced for `number` (submitit's, in a submitit job)."""
        return self._previous.get(number, signal.getsignal(number))


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` needs: JOBID, or ARRAYJOBID_TASKID for an array task."""
    array_job, array_task = (
        os.environ.get("SLURM_ARRAY_JOB_ID"),
        os.environ.get("SLURM_ARRAY_TASK_ID"),
    )
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(stop: StopRequest | None = None) -> None:
    """After a stop request was honoured: have the scheduler run this job again, which resumes it.

    Under hydra-submitit-launcher, submitit's own preemption handler (the one `stop` replaced)
    pickles the job and requeues it; it exits rank 0. A plain SLURM job is requeued with
    `scontrol requeue` by rank 0. Elsewhere nothing happens.
    """
    from q2l.utils import dist

    if "SUBMITIT_FOLDER" in os.environ:
        from submitit import JobEnvironment

        number = JobEnvironment._usr_sig()  # submitit's preemption signal (SIGUSR2 by default)
        handler = stop.previous_handler(number) if stop else signal.getsignal(number)
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
