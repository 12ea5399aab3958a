"""Every command the README and docs/ show composes, and none of them picks up a demo setting.

A run that does not ask for the demo (`experiment=demo`, `dataset=digits`, `make train`) must
compose exactly as if the demo's files did not exist: the test composes each such command with the
demo's two files removed. Hydra reads only the files a defaults list names, so a command that
composes without them composes the same with them, unless an `optional` default could name one and
be skipped silently where it is missing: a test checks that none can.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from q2l.config import CONFIG_DIR

from .conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
ENTRY_POINTS = {
    "train.py": "train",
    "q2l-train": "train",
    "q2l-validate-data": "train",
    "q2l-import": "train",
    "eval.py": "eval",
    "q2l-eval": "eval",
    "predict.py": "predict",
    "q2l-predict": "predict",
    "q2l-export": "export",
    "q2l-attention": "attention",
}
DEMO_FILES = ("experiment/demo.yaml", "dataset/digits.yaml")


def _commands() -> list[tuple[str, str, list[str]]]:
    """(where, config name, overrides) for every command in a ```bash block of the docs; a
    command shown again elsewhere is composed once, where it is first shown."""
    found, seen = [], set()
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for number, line in enumerate(block.replace("\\\n", " ").splitlines()):
                # <date>, <time> and friends are for the reader to fill in.
                words = shlex.split(re.sub(r"<[^>]+>", "x", line.split(" #")[0]), comments=False)
                if words[:1] == ["python"]:
                    words = words[1:]
                if words[:2] == ["make", "train"]:
                    words = [
                        "train.py",
                        "experiment=demo",
                        *[w.removeprefix("ARGS=") for w in words[2:]],
                    ]
                if not words or words[0] not in ENTRY_POINTS:
                    continue
                overrides = [
                    w for w in words[1:] if "=" in w and not w.startswith("-") and w != "..."
                ]
                if "-m" in words:  # a sweep: its first job stands for all of them
                    overrides = [re.sub(r"=([^,\[]*),.*", r"=\1", w) for w in overrides]
                if "resume=auto" in overrides or (
                    overrides and all(o.startswith("hydra.sweep.dir=") for o in overrides)
                ):
                    # Composes from the run's (or the sweep's) saved overrides: test_safety.py
                    # and test_cluster.py run these for real.
                    continue
                if "--config-dir" in words or "--help" in words:
                    # A user's own config folder (test_packaging.py runs one for real); --help
                    # composes nothing (test_the_documented_help_commands_run).
                    continue
                command = (ENTRY_POINTS[words[0]], *overrides)
                if command in seen:
                    continue
                seen.add(command)
                found.append(
                    (f"{doc.name}:{words[0]} #{number}", ENTRY_POINTS[words[0]], overrides)
                )
    return found


COMMANDS = _commands()


def _compose(config_dir: Path, name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return OmegaConf.to_container(compose(config_name=name, overrides=overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def conf_without_demo(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(CONFIG_DIR, copy)
    for relative in DEMO_FILES:
        (copy / relative).unlink()
    return copy


def test_the_docs_show_the_commands_users_type():
    assert len(COMMANDS) >= 15
    assert any("experiment=demo" in overrides for _, _, overrides in COMMANDS)


@pytest.mark.parametrize(
    ("where", "name", "overrides"),
    [
        # The README's commands stay in `make test-fast`; docs/'s (0.15-0.3 s a compose) in
        # `make test`.
        pytest.param(*command, marks=() if command[0].startswith("README") else pytest.mark.slow)
        for command in COMMANDS
    ],
    ids=[c[0] for c in COMMANDS],
)
def test_every_documented_command_composes_without_demo_settings(
    where, name, overrides, conf_without_demo
):
    if "experiment=demo" in overrides or "dataset=digits" in overrides:
        shipped = _compose(Path(CONFIG_DIR), name, overrides)
        assert shipped["dataset"]["name"] == "digits", where
        return
    composed = _compose(conf_without_demo, name, overrides)
    assert not (composed.get("dataset") or {}).get("prepare") and not (
        composed.get("backbone") or {}
    ).get("prepare")


def test_no_optional_default_can_name_a_demo_file():
    """An `optional` default is skipped where its file is missing: one that could name a demo file
    (its group is the demo's, or an interpolation chooses the option) would compose one way with
    the demo's files and another without, which the test above would not see."""
    demo_groups = {Path(relative).parent.name for relative in DEMO_FILES}
    for path in sorted(Path(CONFIG_DIR).rglob("*.yaml")):
        for entry in OmegaConf.load(path).get("defaults") or []:
            if not isinstance(entry, dict):
                continue
            for key, option in entry.items():
                if str(key).startswith("optional "):
                    group = str(key).removeprefix("optional ").split("@")[0].split("/")[-1]
                    assert group not in demo_groups or option is None, (path, entry)
                    assert "${" not in str(option), (path, entry)


def _help_commands() -> list[tuple[str, list[str]]]:
    """(entry point, arguments) of every documented `--help` command."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line.split(" #")[0])
                if words[:1] == ["python"]:
                    words = words[1:]
                if words and words[0] in ENTRY_POINTS and "--help" in words:
                    found.append((words[0], words[1:]))
    return found


def test_the_documented_help_commands_run():
    from q2l.cli.help import command_help, help_topic

    commands = _help_commands()
    assert commands, "the docs show --help"
    for entry, arguments in commands:
        command = {"train": "train", "eval": "eval", "predict": "predict"}.get(
            ENTRY_POINTS[entry], ENTRY_POINTS[entry]
        )
        shown = command_help(command, help_topic(arguments))
        assert not shown.startswith("no help"), (entry, arguments, shown)


def _cited_tests(table_default: list[str], cell: str) -> list[tuple[str, str]]:
    """(files, test) for each test a reliability.md table cell names: `tests/x.py::test_y`,
    `::test_y` (in the file named before it in the cell) or `test_y` (in the table's own files or
    the one named before it); files joined by |."""
    cited, named = [], None
    for path, colons, name in re.findall(r"`(tests/test_\w+\.py)?(::)?(test_\w+)?`", cell):
        if path:
            named = path
        if not name:
            continue
        if path:
            cited.append((path, name))
        elif colons:
            assert named, f"::{name} follows no file in: {cell}"
            cited.append((named, name))
        else:
            cited.append(("|".join([*table_default, *([named] if named else [])]), name))
    return cited


def test_every_test_reliability_md_names_is_in_the_file_it_says():
    defined = {
        path.relative_to(REPO_ROOT).as_posix(): set(
            re.findall(r"^def (test_\w+)", path.read_text(), re.M)
        )
        for path in (REPO_ROOT / "tests").glob("test_*.py")
    }
    cited, default = [], ["tests/test_reliability.py"]
    for line in (REPO_ROOT / "docs" / "reliability.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[-1].startswith("test"):  # a table's header
            default = re.findall(r"`(tests/test_\w+\.py)`", cells[-1]) or [
                "tests/test_reliability.py"
            ]
        elif line.startswith("|"):
            cited += _cited_tests(default, cells[-1])
    assert len(cited) > 50
    missing = [
        f"{files}::{name}"
        for files, name in cited
        if not any(name in defined[path] for path in files.split("|"))
    ]
    assert missing == [], "\n".join(missing)
