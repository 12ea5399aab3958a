"""What went wrong on the user's side, told apart from a bug.

A `UserError` is a problem with what the user gave q2l: a config value a component refuses
(`ConfigError`), or a file or folder that cannot be used as it is (`InputError`: a data set's
files or annotations, a checkpoint, a weights file, a thresholds file, an image, a run directory).
Its message names the key or the file and says what to do. The commands print that message alone
and exit with `EXIT_USER_ERROR`, where a bug shows its traceback; `Q2L_DEBUG=1` (or Hydra's
`HYDRA_FULL_ERROR=1`) shows the traceback of a user error too.
"""

from __future__ import annotations

import os

EXIT_USER_ERROR = 2  # as argparse and Hydra's composition errors: the command line was wrong
EXIT_FAILED = 1

# The operating system's errors about a path the user named: a missing file, a file in the way.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


class UserError(Exception):
    """A problem with what the user asked for or gave q2l, not a bug: the message says what to
    do."""


class ConfigError(UserError, ValueError):
    """A config value a component refuses (the message names the key)."""


class InputError(UserError, ValueError):
    """A file or folder given to q2l that cannot be used as it is (the message names it)."""


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, (UserError, *USER_OS_ERRORS))


def debugging() -> bool:
    """Q2L_DEBUG=1 or HYDRA_FULL_ERROR=1: show every traceback, user errors' included."""
    return any(
        os.environ.get(name, "") not in ("", "0") for name in ("Q2L_DEBUG", "HYDRA_FULL_ERROR")
    )
