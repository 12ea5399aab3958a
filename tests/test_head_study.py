"""benchmarks.head_study: the learning study runs end to end at a tiny size, resumes from its
results file, and reports means, spreads and differences paired by seed."""

from __future__ import annotations

import math

import pytest
from benchmarks import head_study
from benchmarks.head_study import ARMS, RunResult, StudySize, format_table

TINY = StudySize(
    image_size=64,
    num_train=32,
    num_val=24,
    epochs=1,
    seeds=(0, 1),
    batch_size=16,
    pretrain_images=32,
    pretrain_epochs=1,
    pretrain_size=32,
)


@pytest.mark.slow
def test_the_study_runs_every_arm_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setitem(head_study.SIZES, "tiny", TINY)
    argv = ["--out", str(tmp_path), "--size", "tiny", "--arms", "baseline", "official"]
    assert head_study.main(argv) == 0
    table = (tmp_path / "table.md").read_text()
    assert ARMS["baseline"].title in table and ARMS["official"].title in table
    assert (tmp_path / "study.png").stat().st_size > 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4  # 2 arms x 2 seeds
    # A second call finds every run done and only redraws.
    assert head_study.main(argv) == 0
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4


def _run(arm: str, seed: int, final: float) -> RunResult:
    return RunResult(arm, seed, [final - 5, final], 10.0, 1, "cpu", "fp32")


def test_the_table_pairs_seeds_against_global_pooling():
    chosen = {
        "baseline": [_run("baseline", 0, 60.0), _run("baseline", 1, 62.0)],
        "q2l": [_run("q2l", 0, 63.0), _run("q2l", 1, 63.0)],
    }
    table = format_table(chosen, TINY)
    baseline_row, q2l_row = table.splitlines()[-2:]
    assert "| 61.00 | 1.41 | 60.00-62.00 | - |" in baseline_row
    # Paired: +3 on seed 0, +1 on seed 1.
    assert "| 63.00 | 0.00 | 63.00-63.00 | +2.00 (+1.00 to +3.00) | 10 s |" in q2l_row
    assert math.isnan(float(format_table({"q2l": chosen["q2l"][:1]}, TINY).split("|")[-5]))


@pytest.mark.parametrize("name", sorted(ARMS))
def test_every_arm_composes(name):
    cfg = head_study.compose_config(
        ["dataset=digits", "dataset.root=unused", "backbone=resnet18", *ARMS[name].overrides]
    )
    assert cfg.model._target_
