"""How a command ends when something goes wrong: a user error (q2l.utils.errors) prints its
message alone and exits 2; a diverged run (non-finite loss) exits 1 with its message; a bug shows
its traceback. `Q2L_DEBUG=1` or `HYDRA_FULL_ERROR=1` shows every traceback.

In a sweep nothing is caught here: Hydra's launcher records the failed job (and the sweep summary
lists it with its error) and the other jobs go on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from q2l.training.engine import NonFiniteError
from q2l.utils.errors import EXIT_FAILED, EXIT_USER_ERROR, debugging, is_user_error

T = TypeVar("T")


def run_command(program: str, function: Callable[..., T], *args: Any, logged: bool = False) -> T:
    """`function(*args)`, turning what went wrong into the command's exit (module docstring).

    logged: the function already logged the failure's message (train does, into train.log too),
    so it is not printed again.
    """
    try:
        return function(*args)
    except Exception as error:
        if _in_sweep() or debugging():
            raise
        if is_user_error(error):
            code = EXIT_USER_ERROR
        elif isinstance(error, NonFiniteError):
            code = EXIT_FAILED
        else:
            raise  # a bug: its traceback says where
        if not logged:
            print(f"{program}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(code)


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
