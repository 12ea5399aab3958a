"""The monitored metric and the two early-stopping rules of the epoch loop."""

from __future__ import annotations

import json
import random

import pytest

from q2l.training.loop_state import LoopState, early_stop, track_bests
from q2l.training.records import EpochRecord
from q2l.training.run import train


def _official_epochs_run(scores: list[tuple[float, float]], patience: int) -> int:
    """How many epochs main_mlc.py's loop runs on (regular, EMA) mAPs, transcribed from its rule:
    stop when epoch - max(best_epoch, best_regular_epoch) > patience (0-based epochs) and the
    last EMA mAP is below the best EMA mAP, once more than one epoch was validated."""
    best, best_epoch, best_regular, best_regular_epoch, best_ema = 0.0, -1, 0.0, -1, 0.0
    ema_history = []
    for epoch, (regular, ema) in enumerate(scores):
        ema_history.append(ema)
        if regular > best_regular:
            best_regular, best_regular_epoch = regular, epoch
        best_ema = max(best_ema, ema)
        if max(regular, ema) > best:
            best, best_epoch = max(regular, ema), epoch
        since = epoch - max(best_epoch, best_regular_epoch)
        if best_epoch >= 0 and since > patience and len(ema_history) > 1:
            if ema_history[-1] < best_ema:
                return epoch + 1
    return len(scores)


def _q2l_epochs_run(scores: list[tuple[float, float]], patience: int, rule: str) -> int:
    loop = LoopState()
    for epoch, (regular, ema) in enumerate(scores, start=1):
        loop.epoch = epoch
        record = EpochRecord(
            epoch, step=epoch, monitor="mAP_voc", raw={"mAP_voc": regular}, ema={"mAP_voc": ema}
        )
        track_bests(record, loop)
        if early_stop(record, loop, patience, rule):
            return epoch
    return len(scores)


def test_official_rule_stops_where_main_mlc_stops():
    stopped_early = 0
    for seed in range(40):
        rng = random.Random(seed)
        scores, regular, ema = [], 50.0, 45.0
        for _ in range(40):  # noisy rise, then a noisy plateau: both models peak at times
            regular += rng.uniform(-1.0, 2.0) if len(scores) < 15 else rng.uniform(-1.0, 0.9)
            ema += rng.uniform(-0.5, 1.5) if len(scores) < 20 else rng.uniform(-0.6, 0.5)
            scores.append((round(regular, 1), round(ema, 1)))
        patience = rng.choice([1, 3, 8])
        expected = _official_epochs_run(scores, patience)
        assert _q2l_epochs_run(scores, patience, "official") == expected, seed
        stopped_early += expected < len(scores)
    assert stopped_early >= 10  # the sequences exercise the stop, not only the full run


def test_the_two_rules_differ_where_main_mlc_differs():
    # The regular model keeps improving after the best (EMA) epoch: the official rule counts
    # from the later of the two bests, so it stops later than the best-epoch rule.
    scores = [(60, 70), (61, 69), (62, 68), (63, 67), (60, 66), (59, 65), (58, 64)]
    assert _q2l_epochs_run(scores, 2, "best") == 3  # best (70) at epoch 1, two epochs old
    assert _q2l_epochs_run(scores, 2, "official") == 7  # regular best at 4; 7 - 4 > 2
    assert _official_epochs_run(scores, 2) == 7
    # A flat plateau never stops the official rule (the last EMA score is never below the best).
    assert _q2l_epochs_run([(50, 50)] * 6, 1, "official") == 6
    assert _q2l_epochs_run([(50, 50)] * 6, 1, "best") == 2


@pytest.mark.slow
def test_monitor_map_voc_with_the_official_rule_end_to_end(tiny_cfg, tmp_path):
    summary = train(
        tiny_cfg(
            "trainer.epochs=3",
            "trainer.monitor=mAP_voc",
            "trainer.early_stop_rule=official",
            "trainer.early_stop_patience=1",
            # lr 0 and frozen BatchNorm statistics: the same scores every epoch, raw and EMA.
            # The official rule never stops on a plateau (best would, at epoch 2).
            "optimizer.lr=0",
            "backbone.frozen_bn=true",
        ),
        tmp_path / "run",
    )
    assert summary["status"] == "completed" and summary["epochs_run"] == 3
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stored["monitor"] == "mAP_voc"
    best = stored["best"]
    assert best["value"] == pytest.approx(best["metrics"]["mAP_voc_best"])
    assert best["mAP"] == pytest.approx(best["metrics"]["mAP_best"])
    assert best["weights"] == best["metrics"]["eval_weights"]
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["monitor"] == "mAP_voc"
        assert {"mAP_best", "mAP_voc_best", "mAP_voc_ema"} <= set(record)


def test_monitor_is_validated(compose_config):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_config("train", ["dataset=digits", "trainer.monitor=CF1"])
    with pytest.raises(ConfigCompositionException):
        compose_config("train", ["dataset=digits", "trainer.early_stop_rule=never"])
