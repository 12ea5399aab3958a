"""Shared fixtures: a tiny generated digits data set and tiny composed training configs."""

from __future__ import annotations

import gc

# Loading the tests imports torch, timm, q2l and every test module: the cyclic collector would walk
# that growing heap again and again for nothing (as in q2l.cli's start-up), so it pauses until the
# tests are collected (pytest_collection_finish).
gc.disable()

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from q2l.demo.digits import build_digits_coco

REPO_ROOT = Path(__file__).resolve().parents[1]
# q2l.config is imported where a config is composed, not here: it imports torch and timm, which
# pytest-xdist's controller (it loads this file too, then only hands out tests) never needs.
# Tests never use the network: a backbone with pretrained=true and no weights file would otherwise
# try the Hugging Face hub (for about 20 s of retries before it fails). Here it fails at once.
os.environ["HF_HUB_OFFLINE"] = "1"
# MLflow's own default store is ./mlflow.db in the working directory, the repository here: a test
# that does not name a tracking URI writes into a temporary folder instead.
os.environ.setdefault(
    "MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp(prefix='q2l-mlflow-')}/mlflow.db"
)


def pytest_configure(config) -> None:
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        gc.enable()  # pytest-xdist's controller: its workers collect the tests, it does not


def pytest_collection_finish(session) -> None:
    gc.enable()
    gc.freeze()  # what collection loaded stays: later collections skip it


# `make test` runs two workers that take one test file at a time (--dist loadfile), heaviest first
# (seconds a file took in one run with --durations, 2026-12-05): a long file started last keeps
# one worker busy while the other has nothing left. pytest-xdist's own order, most tests first
# (turned off in the Makefile), left the few long ones (the distributed runs, the convergence check,
# the wheel) for the end. A file missing here only runs later; the rest keep their order.
HEAVIEST_FIRST = (
    "test_cluster.py",  # 110 s
    "test_distributed.py",  # 72 s
    "test_safety.py",  # 59 s
    "test_convergence.py",  # 30-39 s
    "test_train.py",  # 30 s
    "test_reliability.py",  # 26 s
    "test_printable.py",  # 18 s
    "test_classifier.py",  # 16 s
    "test_cli.py",  # 15 s
    "test_loggers.py",  # 13 s
    "test_packaging.py",  # 12-14 s
    "test_import.py",  # 11 s
    "test_predict.py",  # 11 s
)


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
    for item in items:
        if "exports" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)  # the ONNX export traces the model: 5-8 s


def run_python(
    args: list[str], env: dict[str, str], timeout: int = 300, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess:
    """`python *args` in `cwd` (the repository root, where a user runs train.py / eval.py),
    capturing text output."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(*paths: Path, timeout: float = 240.0, process=None) -> None:
    """Poll until every path exists (or `process` ended, or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths) and time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return
        time.sleep(0.01)


def fail_if_called(monkeypatch, target, name: str, what: str) -> None:
    """Replace `target.name` with a sentinel that fails the test with `what` when it is called:
    how a test shows that a check stops a run before, say, any data is read.

    A sentinel that is never reached passes silently, also when the code stopped calling
    `target.name` (renamed, imported elsewhere). So each use has a positive control beside it: the
    same call with the check passing reaches the sentinel (`pytest.raises(SENTINEL, match=what)`).
    """
    monkeypatch.setattr(target, name, lambda *args, **kwargs: pytest.fail(what))


# What a sentinel raises: pytest's Failed, a BaseException that no `except Exception` swallows.
SENTINEL = pytest.fail.Exception


def _once_per_run(tmp_path_factory, name: str, build: Callable[[Path], Any]) -> Any:
    """`build(folder)`'s result (JSON), computed once per test run.

    A session fixture is built once per process, and so once per pytest-xdist worker: each of
    `make test`'s workers would train the tiny checkpoint and export it again. Under xdist the
    workers share `name` in the run's temporary root instead; the first to take its lock builds,
    the others wait and read the result.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: the session scope builds it once
        return build(tmp_path_factory.mktemp(name))
    folder = tmp_path_factory.getbasetemp().parent / name
    with FileLock(f"{folder}.lock"):
        done = folder / "done.json"
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            done.write_text(json.dumps(build(folder)))
        return json.loads(done.read_text())


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """A 64 + 32 image digits data set at 32 px, built once per test run."""

    def build(folder: Path) -> str:
        root = build_digits_coco(
            folder / "digits", num_train=64, num_val=32, canvas_size=32, seed=0
        )
        return str(root)

    return Path(_once_per_run(tmp_path_factory, "data", build))


def tiny_overrides(digits_root: Path, cache_dir: Path) -> list[str]:
    """Overrides that make the demo config train in a couple of seconds."""
    return [
        "experiment=demo",
        f"dataset.root={digits_root}",
        # The data set digits_root holds: the demo's builder finds it done.
        "prepare.data.num_train=64",
        "prepare.data.num_val=32",
        "prepare.data.canvas_size=32",
        "dataset.image_size=32",
        "dataset.batch_size=16",
        f"dataset.cache_dir={cache_dir}",
        # timm's 0.4 M-parameter test ResNet: a run's checkpoints are 11 MB instead of ResNet-18's
        # 270 MB, and it trains 3x faster. Tests of a real backbone name it themselves.
        "backbone.name=test_resnet",
        "backbone.pretrained=false",  # the demo's single-digit pretraining has its own test
        "~prepare.backbone",
        "backbone.weights=null",
        "model.hidden_dim=32",
        "model.ffn_dim=64",
        "trainer.epochs=2",
        "trainer.progress_bar=false",
        # TensorBoard's captioned grid of val images: 0.25 s an epoch (loading, drawing and PNG
        # encoding 8 images), a third of a tiny run's CPU. The session's tiny_checkpoint draws it
        # (test_run_log reads it back); tests that choose other loggers drop this line.
        "logger.tensorboard.images=0",
    ]


def compose_shipped(config_name: str = "train", overrides: list[str] | None = None):
    """The shipped conf/'s `config_name` with `overrides`, composed as the command would; Hydra's
    global state is cleared before and after."""
    from q2l.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides or [])
    finally:
        GlobalHydra.instance().clear()


def train_on_one_thread(cfg, run_dir: Path) -> dict:
    """q2l.training.run.train in this process on one intra-op thread: the reference run a test
    compares bitwise with commands started with OMP_NUM_THREADS=1 (a command of its own would add
    3 s of imports). The thread count is restored after."""
    import torch

    from q2l.training.run import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg, run_dir)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def compose_config():
    """compose_config(name, overrides) -> DictConfig, with Hydra's global state cleaned up."""
    return compose_shipped


@pytest.fixture
def tiny_cfg(compose_config, digits_root, tmp_path):
    """The demo config shrunk to the tiny data set; extra overrides appended."""

    def _make(*extra: str):
        return compose_config(
            "train", tiny_overrides(digits_root, tmp_path / "cache") + list(extra)
        )

    return _make


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    """Environment for running train.py / eval.py as a user would, isolated in tmp_path."""
    env = dict(os.environ)
    env["Q2L_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, digits_root) -> Path:
    """best.pt of a 1-epoch fp32 run on the tiny digits data (inference, export, eval reports),
    trained once per test run."""
    from q2l.training.run import train

    def build(base: Path) -> str:
        overrides = [
            *tiny_overrides(digits_root, base / "cache"),
            "trainer.epochs=1",
            "trainer.precision=fp32",  # predict/export parity is checked in fp32
            "trainer.channels_last=false",
            "logger.tensorboard.images=8",  # the grid TensorBoard shows (test_run_log)
        ]
        train(compose_shipped("train", overrides), base / "run")
        return str(base / "run" / "checkpoints" / "best.pt")

    return Path(_once_per_run(tmp_path_factory, "inference-run", build))


@pytest.fixture(scope="session")
def exports(tiny_checkpoint, tmp_path_factory):
    """All three formats of the tiny checkpoint, exported once per test run:
    {format: (path, export() result)}."""
    from q2l.config import CONFIG_DIR
    from q2l.inference.export import export

    names = {
        "onnx": "model.onnx",
        "torchscript": "model.torchscript.pt",
        "safetensors": "model.safetensors",
    }

    def build(folder: Path) -> dict[str, Any]:
        made = {}
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            for fmt, name in names.items():
                overrides = [f"ckpt={tiny_checkpoint}", f"format={fmt}", f"output={folder / name}"]
                made[fmt] = (str(folder / name), export(compose("export", overrides)))
        GlobalHydra.instance().clear()
        return made

    made = _once_per_run(tmp_path_factory, "exports", build)
    return {fmt: (Path(path), result) for fmt, (path, result) in made.items()}
