"""Progress policy: a bar on a terminal, periodic log lines elsewhere, nothing when disabled."""

from __future__ import annotations

import io
import logging

import pytest

from q2l.utils.progress import PeriodicLines, progress_mode, track


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_stream_and_the_switches(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert progress_mode(True, _Terminal()) == "bar"
    assert progress_mode(True, io.StringIO()) == "lines"  # a file, a pipe, a SLURM log
    assert progress_mode(False, _Terminal()) == "off"
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_mode(True, _Terminal()) == "off"
    assert progress_mode(True, io.StringIO()) == "off"
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert progress_mode(True, io.StringIO()) == "lines"


def test_non_terminal_gets_periodic_lines_with_the_postfix(monkeypatch, caplog):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="q2l.utils.progress"):
        bar = track(range(5), 5, "train", stream=stream, interval_s=0.0)
        assert isinstance(bar, PeriodicLines)
        for step in bar:
            bar.set_postfix(loss=0.5 / (step + 1), lr=1e-3)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("train 1/5 (20%)") and "it/s" in lines[0]
    assert "loss=0.25 lr=0.001" in lines[1]  # the postfix set while item 2 ran
    assert lines[-1].startswith("train done: 5 in")
    assert stream.getvalue() == ""  # no carriage-return bar in the log file


def test_a_loop_shorter_than_the_interval_adds_no_line(monkeypatch, caplog):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("Q2L_PROGRESS_INTERVAL", "3600")
    with caplog.at_level(logging.INFO, logger="q2l.utils.progress"):
        assert list(track(range(4), 4, "eval", stream=io.StringIO())) == [0, 1, 2, 3]
    assert not caplog.records


def test_terminal_gets_a_bar_and_disabled_gets_silence(monkeypatch, caplog):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    terminal = _Terminal()
    assert list(track(range(3), 3, "eval", stream=terminal)) == [0, 1, 2]
    assert "eval" in terminal.getvalue()
    quiet = _Terminal()
    with caplog.at_level(logging.INFO, logger="q2l.utils.progress"):
        bar = track(range(3), 3, "eval", enabled=False, stream=quiet)
        bar.set_postfix(loss=1.0)  # harmless when off
        assert list(bar) == [0, 1, 2]
    assert quiet.getvalue() == "" and not caplog.records


@pytest.mark.slow
def test_training_progress_names_the_epoch_and_the_running_mean_loss(
    tiny_cfg, tmp_path, caplog, monkeypatch
):
    import logging

    from q2l.training.run import train

    monkeypatch.setenv("Q2L_PROGRESS_INTERVAL", "0")  # a line after every batch
    with caplog.at_level(logging.INFO):
        train(tiny_cfg("trainer.progress_bar=true", "trainer.log_every_n_steps=1"), tmp_path / "r")
    lines = caplog.text
    assert "epoch 1/2 train 1/4" in lines and "mean_loss=" in lines
    assert "epoch 2/2 val (ema weights)" in lines
    epoch_line = next(r.message for r in caplog.records if r.message.startswith("epoch 2/2 |"))
    assert " mAP raw " in epoch_line and ", EMA " in epoch_line and "mAP_voc raw" in epoch_line
