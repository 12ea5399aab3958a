"""The package as users install it: a wheel holds the code and the configs, and its commands run
from any directory, with the user's own config folder beside q2l's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, tiny_overrides


def _copy_source(target: Path) -> Path:
    """The files a wheel is built from (the checkout's tracked layout), symlinks kept."""
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, target / name)
    for name in ("src", "conf"):
        shutil.copytree(
            REPO_ROOT / name,
            target / name,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "local"),
        )
    return target


@pytest.mark.slow
def test_the_wheel_installs_in_a_fresh_environment_and_trains_from_another_directory(
    digits_root, tmp_path
):
    source = _copy_source(tmp_path / "source")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w"]
        + [str(wheels), str(source)],
        check=True,
        capture_output=True,
    )
    [wheel] = wheels.glob("q2l-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.removeprefix("q2l/conf/") for n in names if n.startswith("q2l/conf/")}
    expected = {
        str(p.relative_to(REPO_ROOT / "conf")) for p in (REPO_ROOT / "conf").rglob("*.yaml")
    }
    assert expected - {e for e in expected if e.startswith("local/")} <= shipped
    assert "hydra_plugins/q2l_sweepers/optuna_sweeper.py" in names

    # A fresh environment: q2l from the wheel only; its dependencies (torch, ...) are read from
    # this environment's site-packages, whose .pth files (the editable q2l) are not processed.
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    python = fresh / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q"]
        + ["--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"Q2L_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    where = subprocess.run(
        [str(python), "-c", "import q2l.config as c; print(c.__file__); print(c.CONFIG_DIR)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(path.startswith(str(fresh)) for path in where), where

    # The user's own configs, without forking: --config-dir adds their folder to the search path.
    own = tmp_path / "my-configs" / "experiment"
    own.mkdir(parents=True)
    (own / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /experiment/demo\ntrainer:\n  epochs: 1\n"
    )
    overrides = [
        o
        for o in tiny_overrides(digits_root, tmp_path / "cache")
        if o not in ("experiment=demo", "trainer.epochs=2")  # mine.yaml chooses both
    ]
    result = subprocess.run(
        [str(fresh / "bin" / "q2l-train"), "--config-dir", str(own.parent), "experiment=mine"]
        + overrides
        + ["hydra.run.dir=run"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 1/1" in (elsewhere / "run" / "train.log").read_text()
    assert (elsewhere / "run" / "checkpoints" / "best.pt").is_file()
