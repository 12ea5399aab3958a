"""q2l.training.checkpoint and checkpoint_format: a checkpoint written atomically, read back with
its checksums verified, in today's format, and the files of a run's checkpoints folder ranked."""

from __future__ import annotations

import errno
import logging
import subprocess

import pytest
import torch
from torch import nn

import q2l
import q2l.training.checkpoint as checkpoint_module
import q2l.utils.atomic as atomic_module
from q2l.metrics import compute_metrics
from q2l.training.checkpoint import (
    WEIGHTS_KEYS,
    CheckpointError,
    find_resumable,
    keep_top,
    load_checkpoint,
    load_strict,
    non_finite_parts,
    purge_periodic,
    save_checkpoint,
    top_checkpoint_name,
    training_payload,
    weights_payload,
)
from q2l.training.checkpoint_format import FORMAT_VERSION, upgrade, upgrade_record
from q2l.training.engine import TrainState
from q2l.utils.errors import InputError

from .helpers.damage import flip_a_bit


def _state(seed: int = 0) -> TrainState:
    """A TrainState of a 4 -> 3 linear model that took one AdamW step (so the optimizer has
    state to save)."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return TrainState(
        model=model,
        loss=nn.BCEWithLogitsLoss(),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        step=1,
    )


def _version_1_checkpoint() -> dict:
    """What q2l 0.1 (format 1) wrote: config keys missing or of older types, one rng entry, no
    validated_epoch, "model" for the raw weights, top-3 metrics counting all three classes."""
    return {
        "format_version": 1,
        "model": {"weight": torch.ones(2)},
        "rng": {"torch": torch.zeros(3, dtype=torch.uint8)},
        "progress": {"epoch": 3, "batches_done": 0},
        "eval_weights": "model",
        "metrics": {"epoch": 3, "mAP": 80.0, "CP_top3": 61.9, "eval_weights": "model"},
        "history": [
            {"epoch": 2, "mAP": 70.0, "OF1_top3_ema": 50.0},
            {"epoch": 3, "mAP": 80.0, "CP_top3": 61.9, "eval_weights": "model"},
        ],
        "config": {
            "backbone": {"name": "resnet18", "kwargs": {"drop_path_rate": 0.1}, "prepare": {}},
            "model": {
                "_target_": "q2l.models.query2label.Query2Label",
                "decoder_self_attention": True,
            },
            "loss": {"_target_": "q2l.losses.AsymmetricLoss"},
            "dataset": {"name": "coco2014"},
            "trainer": {"epochs": 3},
        },
    }


# ---- save and load ----


def test_a_saved_checkpoint_loads_back_equal_with_its_versions(tmp_path):
    state = _state()
    payload = training_payload(state, rng=[{"torch": torch.get_rng_state()}], epoch=2)
    save_checkpoint(payload, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["format_version"] == FORMAT_VERSION
    assert loaded["q2l_version"] == q2l.__version__
    assert loaded["torch_version"] == str(torch.__version__)
    assert (loaded["epoch"], loaded["step"], loaded["ema"]) == (2, 1, None)
    for key, tensor in state.model.state_dict().items():
        assert torch.equal(loaded["model"][key], tensor), key
    assert torch.equal(loaded["rng"][0]["torch"], torch.get_rng_state())

    restored = _state(seed=1)  # other weights, other optimizer moments
    restored.model.load_state_dict(loaded["model"])
    restored.optimizer.load_state_dict(loaded["optimizer"])
    for key, tensor in state.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[key], tensor), key
    first = next(iter(state.optimizer.state.values()))
    again = next(iter(restored.optimizer.state.values()))
    assert torch.equal(first["exp_avg"], again["exp_avg"])


def test_weights_payload_keeps_what_evaluation_needs_only():
    payload = training_payload(_state(), rng=[], config={"a": 1}, class_names=["x"], epoch=1)
    slim = weights_payload(payload)
    assert set(slim) == set(WEIGHTS_KEYS) & set(payload)
    assert {"optimizer", "scheduler", "scaler", "rng"}.isdisjoint(slim)


def test_a_checkpoint_with_flipped_bits_is_refused_naming_the_file_and_the_record(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "weights": torch.arange(10_000.0)}, path)
    record = flip_a_bit(path)
    assert torch.load(path, weights_only=True)["step"] == 1  # torch alone loads it silently
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert f"{path} is damaged: record '{record}' fails its CRC-32 checksum" in str(error.value)


def test_a_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "weights": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{path} cannot be read; it is truncated, corrupt"):
        load_checkpoint(path)


def test_a_missing_file_and_a_foreign_one_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere.pt"):
        load_checkpoint(tmp_path / "nowhere.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "theirs.pt")
    with pytest.raises(CheckpointError, match="not a q2l checkpoint"):
        load_checkpoint(tmp_path / "theirs.pt")


def test_future_checkpoint_format_is_refused(tmp_path):
    torch.save({"format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path / "future.pt")


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    calls = []

    def full_disk(obj, handle, *args, **kwargs):
        calls.append(obj["step"])
        handle.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(
        CheckpointError, match="No space left on device.*previous last.pt is intact"
    ):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert calls == [2]  # the failing write was the one under test
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_interrupted_save_leaves_no_partial_file(tmp_path, monkeypatch):
    def interrupted(obj, handle, *args, **kwargs):
        handle.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 1}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


class _FullDisk:
    """A file whose writes fail with ENOSPC after `room` bytes, as a real full disk's do."""

    def __init__(self, handle, room: int = 300) -> None:
        self._handle, self._room = handle, room
        self.name = handle.name

    def write(self, data) -> int:
        if self._room < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.close()


def test_9_disk_full_is_reported_as_such(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    real = atomic_module.tempfile.NamedTemporaryFile
    monkeypatch.setattr(
        atomic_module.tempfile, "NamedTemporaryFile", lambda *a, **k: _FullDisk(real(*a, **k))
    )
    with pytest.raises(
        CheckpointError, match=rf"{path}: No space left on device; the previous last.pt is intact"
    ):
        save_checkpoint({"step": 2, "weights": torch.zeros(10_000)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_9_a_really_full_file_system(tmp_path):
    """The same on a real 64 KiB tmpfs where this machine allows mounting one (root)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        save_checkpoint({"step": 1}, mount / "last.pt")
        with pytest.raises(
            CheckpointError, match="No space left on device; the previous last.pt is intact"
        ):
            save_checkpoint({"step": 2, "weights": torch.zeros(100_000)}, mount / "last.pt")
        assert load_checkpoint(mount / "last.pt")["step"] == 1
        assert [p.name for p in mount.iterdir()] == ["last.pt"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ---- format upgrades ----


def test_upgrade_brings_a_version_1_checkpoint_to_todays_format():
    old = _version_1_checkpoint()
    upgraded = upgrade(old)
    assert upgraded["format_version"] == FORMAT_VERSION
    # The raw weights are "raw" and the top-3 metrics that counted all classes are *_top3_all,
    # in the last record and in every record of the history.
    assert upgraded["eval_weights"] == "raw"
    assert upgraded["metrics"] == {
        "epoch": 3,
        "mAP": 80.0,
        "CP_top3_all": 61.9,
        "eval_weights": "raw",
    }
    assert upgraded["history"] == [
        {"epoch": 2, "mAP": 70.0, "OF1_top3_all_ema": 50.0},
        {"epoch": 3, "mAP": 80.0, "CP_top3_all": 61.9, "eval_weights": "raw"},
    ]
    # One rng entry per process; 0.1 validated every epoch it trained.
    assert isinstance(upgraded["rng"], list) and len(upgraded["rng"]) == 1
    assert upgraded["progress"] == {"epoch": 3, "batches_done": 0, "validated_epoch": 3}
    # Missing config keys hold the value each run had in effect; renamed and retyped keys.
    config = upgraded["config"]
    assert config["backbone"] == {
        "name": "resnet18",
        "timm_kwargs": {"drop_path_rate": 0.1},
        "freeze": "none",
        "frozen_bn": False,
        "normalization": "pretrained",
    }
    assert config["model"]["decoder_self_attention"] == "all"
    assert config["model"]["norm"] == "post"  # a Query2Label head only
    assert "class_priors_file" not in config["loss"]  # the partial-label loss only
    assert config["trainer"] == {"epochs": 3, "monitor": "mAP", "early_stop_rule": "best"}
    assert config["dataset"] == {"name": "coco2014", "decode": "workers"}  # version 3's key
    # A new dict: the caller's checkpoint is unchanged, the tensors shared.
    assert old == {**_version_1_checkpoint(), "model": old["model"], "rng": old["rng"]}
    assert old["format_version"] == 1 and "kwargs" in old["config"]["backbone"]
    assert upgraded["model"]["weight"] is old["model"]["weight"]


def test_upgrade_leaves_a_current_checkpoint_as_it_is():
    current = {"format_version": FORMAT_VERSION, "eval_weights": "model", "config": {}}
    assert upgrade(current) is current


def test_every_load_upgrades_an_old_checkpoint_and_refuses_a_newer_one(tmp_path):
    torch.save(_version_1_checkpoint(), tmp_path / "old.pt")  # as q2l 0.1 wrote it
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["format_version"] == FORMAT_VERSION
    assert loaded["eval_weights"] == "raw" and "CP_top3_all" in loaded["metrics"]
    torch.save({**_version_1_checkpoint(), "format_version": FORMAT_VERSION + 1}, tmp_path / "new")
    with pytest.raises(
        CheckpointError, match=rf"format {FORMAT_VERSION + 1}, newer than .* \({FORMAT_VERSION}\)"
    ):
        load_checkpoint(tmp_path / "new")


def test_runs_started_before_the_new_options_resume_unchanged():
    from q2l.training.resume import config_diff

    saved = {
        "backbone": {"name": "resnet18", "timm_kwargs": None},
        "model": {
            "_target_": "q2l.models.query2label.Query2Label",
            "decoder_self_attention": False,
        },
        "trainer": {"epochs": 3},
        "augment": {"randaugment": True},
    }
    current = {
        "backbone": {
            "name": "resnet18",
            "timm_kwargs": {},
            "freeze": "none",
            "frozen_bn": False,
            "normalization": "pretrained",
        },
        "model": {
            "_target_": "q2l.models.query2label.Query2Label",
            "decoder_self_attention": "none",
            "norm": "post",
        },
        "trainer": {"epochs": 3, "monitor": "mAP", "early_stop_rule": "best"},
        "augment": {"randaugment": True, "randaugment_policy": "torchvision"},
    }
    saved = upgrade({"format_version": 1, "config": saved})["config"]  # as every load does
    assert config_diff(saved, current) == []
    current["augment"]["randaugment_policy"] = "official"  # a real change is still reported
    current["trainer"]["monitor"] = "mAP_voc"
    current["model"]["norm"] = "pre"  # today's default: the run had the official layout in effect
    assert config_diff(saved, current) == [
        "augment.randaugment_policy: 'torchvision' -> 'official'",
        "model.norm: 'post' -> 'pre'",
        "trainer.monitor: 'mAP' -> 'mAP_voc'",
    ]


def test_runs_started_before_dataset_decode_resume_unchanged():
    saved = {"format_version": 2, "config": {"dataset": {"num_workers": 2}}, "eval_weights": "raw"}
    saved["metrics"] = {"CP_top3": 0.5, "CP_top3_all": 0.4}
    upgraded = upgrade(saved)
    assert upgraded["config"]["dataset"] == {"num_workers": 2, "decode": "workers"}
    assert upgraded["metrics"] == saved["metrics"]  # version 2's names are today's


def test_old_records_get_todays_top_k_names() -> None:
    old = {
        "epoch": 3,
        "mAP": 80.0,
        "CP": 70.0,
        "CP_top3": 61.9,
        "OF1_top3": 50.0,
        "CP_top3_ema": 62.0,
    }
    upgraded = upgrade_record(old)  # as every load of a format-1 checkpoint does
    assert upgraded == {
        "epoch": 3,
        "mAP": 80.0,
        "CP": 70.0,
        "CP_top3_all": 61.9,
        "OF1_top3_all": 50.0,
        "CP_top3_all_ema": 62.0,
    }
    assert old["CP_top3"] == 61.9  # the caller's record is not changed
    scores = torch.rand(50, 7, generator=torch.Generator().manual_seed(1))
    today = compute_metrics(scores, (scores > 0.7).long())
    assert {f"{name}_top3_all" for name in ("CP", "CR", "CF1", "OP", "OR", "OF1")} <= set(today)


# ---- what is in a checkpoints folder ----


def test_find_resumable_takes_the_highest_step_last_on_a_tie_and_skips_damaged_files(
    tmp_path, caplog
):
    assert find_resumable(tmp_path) is None  # nothing to resume: a fresh start
    for name, step in [("last.pt", 4), ("step-00000004.pt", 4), ("step-00000002.pt", 2)]:
        save_checkpoint({"step": step, "name": name}, tmp_path / name)
    save_checkpoint({"step": 99}, tmp_path / "best.pt")  # not a resume candidate
    path, payload = find_resumable(tmp_path)
    assert (path.name, payload["name"]) == ("last.pt", "last.pt")

    save_checkpoint({"step": 6, "weights": torch.zeros(1000)}, tmp_path / "step-00000006.pt")
    flip_a_bit(tmp_path / "step-00000006.pt")  # the newest, damaged: skipped, and said so
    with caplog.at_level(logging.WARNING):
        path, payload = find_resumable(tmp_path)
    assert (path.name, payload["step"]) == ("last.pt", 4)
    assert "resuming from" in caplog.text and "instead of the unreadable step-00000006.pt" in (
        caplog.text
    )


def test_find_resumable_refuses_a_folder_of_unreadable_checkpoints(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no readable checkpoint.*unreadable: last.pt"):
        find_resumable(tmp_path)


def test_keep_last_purges_by_scanning_the_folder(tmp_path):
    for step in (3, 6, 9, 12):
        save_checkpoint({"step": step}, tmp_path / f"step-{step:08d}.pt")
    (tmp_path / "notes.pt").write_text("not ours")
    purge_periodic(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.pt",
        "step-00000009.pt",
        "step-00000012.pt",
    ]


def test_keep_top_keeps_the_best_values_and_the_earlier_epoch_of_a_tie(tmp_path):
    for value, epoch in [(70.0, 1), (80.5, 2), (60.0, 3), (80.5, 4)]:
        (tmp_path / top_checkpoint_name(value, epoch)).write_bytes(b"")
    (tmp_path / "best.pt").write_bytes(b"")
    assert top_checkpoint_name(80.5, 2) == "top-080.5000-epoch0002.pt"
    keep_top(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt",
        "top-070.0000-epoch0001.pt",
        "top-080.5000-epoch0002.pt",
        "top-080.5000-epoch0004.pt",
    ]
    keep_top(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "top-080.5000-epoch0002.pt"]


def test_non_finite_parts_names_each_part_that_holds_inf_or_nan():
    state = _state()
    assert non_finite_parts(state) == []
    next(iter(state.optimizer.state.values()))["exp_avg_sq"].fill_(float("nan"))
    assert non_finite_parts(state) == ["optimizer state"]
    with torch.no_grad():
        state.model.bias.fill_(float("inf"))
    assert non_finite_parts(state) == ["model weights", "optimizer state"]


def test_load_strict_names_every_mismatched_missing_and_unexpected_key(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    state = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(3), "2.weight": torch.zeros(1)}
    with pytest.raises(InputError) as error:
        load_strict(model, state, tmp_path / "x.pt")
    message = str(error.value)
    assert "1 mismatched (0.weight: checkpoint (5, 4) vs model (3, 4))" in message
    assert "2 missing (1.bias, 1.weight)" in message and "1 unexpected (2.weight)" in message
    own = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    load_strict(model, own, tmp_path / "x.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())
