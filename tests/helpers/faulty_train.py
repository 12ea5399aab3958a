"""q2l's training CLI with a fault injected on one rank, for tests/test_distributed.py.

    torchrun ... tests/helpers/faulty_train.py <train overrides>

Q2L_TEST_FAULT="nan:<rank>:<call>" makes the loss NaN at the <call>-th loss evaluation of <rank>;
"exit:<rank>:<call>" kills that rank there (os._exit, as a crash would). Q2L_TEST_SIGNAL=
"<rank>:<phase>:<SIGNAME>" sends <rank> that signal during a start-up phase: "validate" (the data
check), "model" (building the model), "resume" (finding the checkpoint to resume). Q2L_TEST_RECORD=
<dir> records each rank's pid (pid-<rank>) once training starts and its exit code (exit-<rank>).
"""

import os
import signal
import sys
from pathlib import Path

import q2l.training.build
import q2l.training.plan
import q2l.training.run
from q2l.cli import train
from q2l.losses import AsymmetricLoss

RANK = int(os.environ.get("RANK", 0))
RECORD = Path(os.environ["Q2L_TEST_RECORD"]) if os.environ.get("Q2L_TEST_RECORD") else None


def _inject() -> None:
    kind, rank, call = (os.environ.get("Q2L_TEST_FAULT") or "none:-1:0").split(":")
    original = AsymmetricLoss.forward
    calls = {"n": 0}

    def forward(self, logits, targets):
        calls["n"] += 1
        if calls["n"] == 1 and RECORD is not None:
            (RECORD / f"pid-{RANK}").write_text(str(os.getpid()))
        loss = original(self, logits, targets)
        if int(rank) == RANK and calls["n"] == int(call):
            if kind == "exit":
                os._exit(13)
            if kind == "nan":
                return loss * float("nan")
        return loss

    AsymmetricLoss.forward = forward


# Where each start-up phase can be caught: (module, function name).
PHASES = {
    "validate": (q2l.training.build, "validate_splits"),
    "model": (q2l.training.run, "build_model"),
    "resume": (q2l.training.plan, "find_resumable"),
}


def _inject_signal() -> None:
    if not os.environ.get("Q2L_TEST_SIGNAL"):
        return
    rank, phase, name = os.environ["Q2L_TEST_SIGNAL"].split(":")
    if int(rank) != RANK:
        return
    module, function = PHASES[phase]
    original = getattr(module, function)

    def signalled(*args, **kwargs):
        signal.raise_signal(getattr(signal, name))
        return original(*args, **kwargs)

    setattr(module, function, signalled)


if __name__ == "__main__":
    _inject()
    _inject_signal()
    sys.argv[0] = "train.py"
    try:
        train.main()
        code = 0
    except SystemExit as error:
        code = error.code if isinstance(error.code, int) else 1
        raise
    except BaseException:
        code = 1
        raise
    finally:
        if RECORD is not None:
            (RECORD / f"exit-{RANK}").write_text(str(code))
