"""The run directory: whether q2l may use it, by one process at a time, and when it may write there.

A run directory is new (missing or empty: Hydra has just made it) or a q2l run (it holds
`RUN_MARKER`). Anything else is refused, naming the folder, so `hydra.run.dir` pointed at a data
set or a home folder changes nothing there. Opening a directory takes an exclusive lock (`flock`
on `.q2l.lock`; the kernel drops it when the process dies, so a killed run never blocks its
rerun) and a second process on a live run is refused.

Nothing is written into an existing run until `start()`, which the caller reaches only once the
start is accepted (config and resume checked). A refused or failed start therefore leaves an
earlier run exactly as it was. A new run starts at once, so even its early failures are recorded.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from q2l.utils.atomic import atomic_write
from q2l.utils.errors import UserError
from q2l.utils.messages import and_more
from q2l.utils.printable import PrintableFormatter

log = logging.getLogger(__name__)

RUN_MARKER = ".q2l-run"
LOCK_NAME = ".q2l.lock"
LOG_NAME = "train.log"
OUTPUT_SUBDIRS = ("checkpoints", "tensorboard")
# What save_checkpoint writes before its rename: `.<name>.<random>.tmp`.
TEMPORARY_GLOB = ".*.tmp"
_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used: foreign, busy or not writable. Nothing was changed."""


class RunDirectory:
    """One run's folder, held open (locked) from `open()` to `close()`.

    Attributes:
        path: the folder.
        existing: it held a q2l run before this process opened it.
        started: `start()` ran; from then on the run is this process's to write.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.existing = False
        self.started = False
        self._lock_fd: int | None = None
        self._log_handler: logging.Handler | None = None

    def open(self) -> RunDirectory:
        """Classify the folder (new / q2l run / refused) and take its lock."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunDirError(f"run directory {self.path} cannot be created: {error}") from error
        if not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} is not a folder")
        entries = sorted(entry.name for entry in self.path.iterdir())
        # Only q2l's own marker makes a folder a q2l run: another Hydra project's run (config.yaml,
        # .hydra/, checkpoints/) looks the same from outside and must not be written into.
        self.existing = RUN_MARKER in entries
        if entries and not self.existing and entries != [LOCK_NAME]:
            raise RunDirError(
                f"run directory {self.path} holds files but no {RUN_MARKER} marker, so it is not "
                f"a q2l run ({and_more(entries, 5)}); nothing was changed. Pass an empty or new "
                "hydra.run.dir"
            )
        self._lock()
        return self

    def preflight(self) -> None:
        """Fail now, before any data is read, if a folder the run writes into is not writable."""
        for folder in (self.path, *(self.path / name for name in OUTPUT_SUBDIRS)):
            try:
                folder.mkdir(exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as error:
                raise RunDirError(
                    f"{folder} is not writable ({error}); the run would fail when it first "
                    "saves there. Fix its permissions or choose another hydra.run.dir"
                ) from error

    def remove_temporaries(self) -> None:
        """Delete half-written checkpoint files left by a process that was killed while saving."""
        for leftover in (self.path / "checkpoints").glob(TEMPORARY_GLOB):
            log.warning("removing %s, left by a run killed while it was saving", leftover)
            leftover.unlink(missing_ok=True)

    def start(self, cfg: DictConfig, hydra: DictConfig | None = None) -> None:
        """The run is accepted: mark the folder, write the config (and .hydra/), log to train.log.

        config.yaml is the resolved config; .hydra/ holds what Hydra composed, its own config and
        the command's overrides, as Hydra itself would write them.
        """
        # Each file is written whole or not at all (a stop signal may arrive at any moment); the
        # marker last, so a folder holding it holds the rest.
        files = {self.path / "config.yaml": OmegaConf.to_yaml(cfg, resolve=True)}
        if hydra is not None:
            hydra_dir = self.path / ".hydra"
            files[hydra_dir / "config.yaml"] = OmegaConf.to_yaml(cfg)
            files[hydra_dir / "hydra.yaml"] = OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra}))
            files[hydra_dir / "overrides.yaml"] = OmegaConf.to_yaml(hydra.overrides.task)
        files[self.path / RUN_MARKER] = json.dumps({"created_by": "q2l"}) + "\n"
        for path, text in files.items():
            with atomic_write(path, "w") as handle:
                handle.write(text)
        self._log_handler = logging.FileHandler(self.path / LOG_NAME, encoding="utf-8")
        self._log_handler.setFormatter(PrintableFormatter(_LOG_FORMAT))
        logging.getLogger().addHandler(self._log_handler)
        self.started = True

    def close(self) -> None:
        """Stop logging to train.log and release the lock."""
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> RunDirectory:
        return self.open()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _lock(self) -> None:
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise RunDirError(f"run directory {self.path} is not writable: {error}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirError(
                    f"run directory {self.path} is in use by {holder}; wait for it to end, or "
                    "use another hydra.run.dir. Nothing was changed"
                ) from None
            raise RunDirError(f"cannot lock run directory {self.path}: {error}") from error
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        holder = f"q2l pid {os.getpid()} on {socket.gethostname()} since {since}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._lock_fd = fd


def with_saved_overrides(argv: list[str]) -> list[str]:
    """For `resume=auto hydra.run.dir=X`: X's saved overrides, then the command's own (which win).

    So the one-line README command continues X as it was configured, not with the defaults.
    Other command lines are returned unchanged. `argv` excludes the program name.
    """
    if "-m" in argv or "--multirun" in argv:
        return argv
    given = dict(_split(arg) for arg in argv if not arg.startswith("-"))
    run_dir = given.get("hydra.run.dir")
    if given.get("resume") != "auto" or not run_dir:
        return argv
    saved_file = Path(run_dir).expanduser() / ".hydra" / "overrides.yaml"
    if not saved_file.is_file():
        return argv
    saved = [str(item) for item in OmegaConf.load(saved_file)]
    kept = [item for item in saved if _split(item)[0] not in given]
    if kept:
        print(
            f"resume=auto: continuing {run_dir} with its saved overrides: {' '.join(kept)}",
            file=sys.stderr,
        )
    return add_overrides(argv, kept)


# Hydra's command-line options that take a value (`--cfg job`); `--info` takes one optionally.
_OPTIONS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name"}
_OPTIONS_WITH_VALUE |= {"-cn", "--config-dir", "-cd", "--experimental-rerun"}
_INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def add_overrides(argv: list[str], before: list[str], flags: list[str] = ()) -> list[str]:
    """`argv` with the overrides `before` ahead of its own (which win) and `flags` (e.g. `-m`)
    added: options first, then all overrides together, as Hydra's parser needs them."""
    options, overrides = [], []
    arguments = iter(argv)
    for argument in arguments:
        if not argument.startswith("-"):
            overrides.append(argument)
            continue
        options.append(argument)
        if argument in _OPTIONS_WITH_VALUE:
            options.append(next(arguments, ""))
        elif argument in ("--info", "-i"):
            following = next(arguments, None)
            if following in _INFO_VALUES:
                options.append(following)
            elif following is not None:
                overrides.append(following)
    return [*options, *flags, *before, *overrides]


def _split(override: str) -> tuple[str, str]:
    """('trainer.epochs', '5') from 'trainer.epochs=5', '+trainer.epochs=5' or '~trainer.epochs'."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def register_resolvers() -> None:
    """`${q2l_now:<strftime pattern>}`: this run's start time, which names its directory
    (conf/hydra/default.yaml).

    Cached, as Hydra's own `now`: the value is kept in the config's resolver cache, which travels
    with the config. A sweep's directory is therefore decided once, in the process that submits
    it, and every job process, requeue and rank that a launcher starts from the pickled config
    (submitit) resolves the same directory instead of its own start time.
    """
    OmegaConf.register_new_resolver(
        "q2l_now", lambda pattern: run_time().strftime(pattern), replace=True, use_cache=True
    )
    OmegaConf.register_new_resolver("q2l_run_name", run_name, replace=True)


def run_name(choices: Any) -> str:
    """What ran, for directory names: the experiment option (else the data set's), the backbone
    option and the head option (`hydra.runtime.choices`), joined by `_`, file-name safe."""
    first = choices.get("experiment") or choices.get("dataset")
    parts = [first, choices.get("backbone"), choices.get("model")]
    return "_".join(re.sub(r"[^\w.-]+", "-", str(part)) for part in parts if part)


def run_time() -> datetime.datetime:
    """This run's start time, which names its directory (`${q2l_now:...}` in
    conf/hydra/default.yaml): the first call's time, or what `set_run_time` agreed on."""
    global _RUN_TIME
    if _RUN_TIME is None:
        _RUN_TIME = datetime.datetime.now()
    return _RUN_TIME


def set_run_time(value: datetime.datetime) -> None:
    """Use `value` as this run's start time: every process of a torchrun job takes rank 0's, so
    that all of them name the same directory."""
    global _RUN_TIME
    _RUN_TIME = value


_RUN_TIME: datetime.datetime | None = None
