"""A user's data, weights and finished runs survive every command; each test names its point.

docs/reliability.md lists these guarantees with the tests below.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import q2l.training.run as train_module
from q2l.cli.validate_data import main as validate_main
from q2l.config.checks import ConfigValueError
from q2l.demo.owned import FolderNotOursError
from q2l.losses import AsymmetricLoss
from q2l.models.weights import WeightsFileError, read_state_dict
from q2l.training.checkpoint import (
    CheckpointError,
    find_resumable,
    load_checkpoint,
    save_checkpoint,
)
from q2l.training.preemption import EXIT_PREEMPTED
from q2l.training.run import train
from q2l.training.rundir import LOCK_NAME, RunDirError

from .conftest import (
    REPO_ROOT,
    SENTINEL,
    compose_shipped,
    fail_if_called,
    run_python,
    tiny_overrides,
    train_on_one_thread,
    wait_for,
)

EXACT = ("trainer.deterministic=true", "model.dropout=0.1")


def _tree(root: Path, skip: tuple[str, ...] = (LOCK_NAME,)) -> dict[str, bytes]:
    """Every file under `root` with its bytes (the lock file's holder line excluded)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


@pytest.fixture
def users_coco(tmp_path) -> Path:
    """A user's own COCO-2014-layout folder: the exact names the demo builder writes."""
    root = tmp_path / "my_coco"
    for folder in ("train2014", "val2014", "annotations"):
        (root / folder).mkdir(parents=True)
    (root / "train2014" / "COCO_train2014_000000000009.jpg").write_bytes(b"a real photo")
    (root / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(b"another real photo")
    (root / "annotations" / "instances_train2014.json").write_text('{"images": []}')
    (root / "annotations" / "instances_val2014.json").write_text('{"images": []}')
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_root):
    """A finished 1-epoch run, trained through the CLI as a user does (with .hydra/ saved)."""
    base = tmp_path_factory.mktemp("finished")
    run_dir = base / "run"
    env = {**os.environ, "Q2L_CACHE_DIR": str(base / "cache")}
    result = run_python(
        [
            "train.py",
            *tiny_overrides(digits_root, base / "cache"),
            "trainer.epochs=1",
            f"hydra.run.dir={run_dir}",
        ],
        env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


# 1. A user's COCO folder is never touched by the demo.


def test_1_validate_data_without_dataset_refuses_and_keeps_the_folder(users_coco, capsys):
    before = _tree(users_coco)
    assert validate_main([f"dataset.root={users_coco}"]) == 2
    assert "You must specify 'dataset'" in capsys.readouterr().err
    assert _tree(users_coco) == before


def test_1_the_demo_pointed_at_a_users_folder_refuses_and_keeps_it(users_coco, tiny_cfg, tmp_path):
    before = _tree(users_coco)
    with pytest.raises(FolderNotOursError, match=f"{users_coco}.*q2l did not write"):
        train(tiny_cfg(f"dataset.root={users_coco}"), tmp_path / "run")
    assert _tree(users_coco) == before


@pytest.mark.slow
def test_1_eval_never_runs_a_preparation_step_from_a_checkpoint(
    finished_run, compose_config, tmp_path, users_coco
):
    from q2l.evaluation.evaluate import evaluate_checkpoint

    payload = load_checkpoint(finished_run / "checkpoints" / "best.pt")
    payload["config"]["prepare"]["data"]["root"] = str(
        users_coco
    )  # a checkpoint naming another root
    tampered = tmp_path / "tampered.pt"
    save_checkpoint(
        {
            k: v
            for k, v in payload.items()
            if k not in ("format_version", "q2l_version", "torch_version")
        },
        tampered,
    )
    before = _tree(users_coco)
    result = evaluate_checkpoint(compose_config("eval", [f"ckpt={tampered}"]))
    assert result["num_images"] > 0
    assert _tree(users_coco) == before


# 2. A user's weights file is never overwritten; a mistyped path is an error.


@pytest.mark.slow
def test_2_the_demo_with_a_users_weights_file_loads_it_and_never_writes_it(
    compose_config, digits_root, tmp_path, monkeypatch
):
    from q2l.models import TimmBackbone

    weights = tmp_path / "w" / "my_imagenet_resnet10t.safetensors"
    weights.parent.mkdir()
    save_file(
        {
            k: v.contiguous()
            for k, v in TimmBackbone("resnet10t", pretrained=False).body.state_dict().items()
        },
        str(weights),
    )
    before = weights.read_bytes()
    monkeypatch.setenv("Q2L_DATA_DIR", str(tmp_path / "data"))
    # The demo with its backbone pretraining on (tiny), and the user's own weights file.
    overrides = [
        o
        for o in tiny_overrides(digits_root, tmp_path / "cache")
        if not o.startswith(("backbone.", "~prepare.backbone"))
    ]
    cfg = compose_config(
        "train",
        [
            *overrides,
            "trainer.epochs=1",
            f"backbone.weights={weights}",
            "prepare.backbone.num_images=64",
            "prepare.backbone.epochs=1",
            "+prepare.backbone.batch_size=32",
        ],
    )
    assert train(cfg, tmp_path / "run")["status"] == "completed"
    assert weights.read_bytes() == before
    assert sorted(p.name for p in weights.parent.iterdir()) == [weights.name]


def test_2_a_mistyped_weights_path_fails_and_creates_nothing(tiny_cfg, tmp_path):
    typo = tmp_path / "w" / "my_imagenet_resnet18.safetensros"
    with pytest.raises(
        FileNotFoundError, match=r"backbone.weights=.*safetensros.*no such file.*pretrained=false"
    ):
        train(tiny_cfg("backbone.pretrained=true", f"backbone.weights={typo}"), tmp_path / "run")
    assert not typo.parent.exists()


# 4. A refused resume leaves a finished run exactly as it was; resume=auto alone continues a run.


@pytest.mark.slow
def test_4_a_refused_resume_touches_nothing_of_a_finished_run(finished_run, cli_env):
    before = _tree(finished_run)
    result = run_python(
        ["train.py", "resume=auto", f"hydra.run.dir={finished_run}", "optimizer.lr=0.5"], cli_env
    )
    assert result.returncode != 0
    assert "optimizer.lr: 0.001 -> 0.5" in result.stdout + result.stderr
    assert _tree(finished_run) == before


@pytest.mark.slow
def test_4_resume_null_never_trains_over_a_run_with_checkpoints(finished_run, tiny_cfg):
    before = _tree(finished_run)
    with pytest.raises(RunDirError, match="holds a run with checkpoints, and resume=null"):
        train(tiny_cfg("trainer.epochs=1", "resume=null"), finished_run)
    assert _tree(finished_run) == before


@pytest.mark.slow
def test_4_resume_auto_alone_reuses_the_runs_own_overrides(finished_run, cli_env):
    before = _tree(finished_run)
    result = run_python(["train.py", "resume=auto", f"hydra.run.dir={finished_run}"], cli_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "continuing" in result.stderr and "experiment=demo" in result.stderr
    assert "already finished" in result.stdout
    assert _tree(finished_run) == before  # finished: nothing to do, nothing written


# 5. Preemption of the whole process group, with DataLoader workers.


def _cli_run(digits_root, base: Path, *extra: str) -> list[str]:
    """train.py and its arguments for the preemption runs (without the interpreter)."""
    return [
        "train.py",
        *tiny_overrides(digits_root, base / "cache"),
        *EXACT,
        "trainer.slurm_requeue=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted_cli(tmp_path_factory, digits_root):
    """Final weights of the 2-epoch run the preemption tests interrupt, run without a stop: in
    this process (a command of its own would add 3 s of imports), on one thread as the commands
    run (test_5 gives them OMP_NUM_THREADS=1)."""
    base = tmp_path_factory.mktemp("uninterrupted")
    overrides = _cli_run(digits_root, base)[1:]  # the same overrides, without train.py
    assert train_on_one_thread(compose_shipped("train", overrides), base / "run")["status"] == (
        "completed"
    )
    return load_checkpoint(base / "run" / "checkpoints" / "last.pt")["model"]


@pytest.mark.slow
@pytest.mark.parametrize(("number", "workers"), [(signal.SIGTERM, 2), (signal.SIGINT, 0)])
def test_5_a_signal_to_the_process_group_checkpoints_exits_75_and_resumes_exactly(
    number, workers, uninterrupted_cli, cli_env, digits_root, tmp_path
):
    cli_env = {**cli_env, "OMP_NUM_THREADS": "1"}  # as the uninterrupted run
    run_dir = tmp_path / "run"
    command = _cli_run(
        digits_root, tmp_path, f"dataset.num_workers={workers}", f"hydra.run.dir={run_dir}"
    )
    process = subprocess.Popen(
        [sys.executable, *command],
        cwd=REPO_ROOT,
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for(run_dir / "checkpoints" / "last.pt")
    os.killpg(process.pid, number)  # what SLURM, `kill -- -PGID` and Ctrl-C do
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "killed by signal" not in stderr
    stopped = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert stopped["progress"]["status"] == "running"

    resumed = run_python([*command, "resume=auto"], cli_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    for key, tensor in uninterrupted_cli.items():
        assert torch.equal(tensor, final[key]), key


def test_5_dataloader_workers_leave_stop_signals_to_the_main_process():
    from q2l.data.loader import ignore_stop_signals

    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
    previous = {n: signal.getsignal(n) for n in stops}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(n) == signal.SIG_IGN for n in previous)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# 6. Leftover temporary files are removed; resume picks the newest checkpoint by recorded step.


@pytest.mark.slow
def test_6_resume_takes_the_highest_step_and_clears_leftovers(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train(
        tiny_cfg(
            *EXACT, "trainer.epochs=1", "trainer.checkpoint_every_steps=2", "trainer.keep_last=5"
        ),
        run_dir,
    )
    checkpoints = run_dir / "checkpoints"
    # kill -9 while last.pt was being rewritten at step 4: last.pt still holds step 2, a temp file
    # stays.
    (checkpoints / "last.pt").write_bytes((checkpoints / "step-00000002.pt").read_bytes())
    leftover = checkpoints / ".last.pt.k9x2j.tmp"
    leftover.write_bytes(b"half a checkpoint")
    path, payload = find_resumable(checkpoints)
    assert (path.name, payload["step"]) == ("step-00000004.pt", 4)
    summary = train(
        tiny_cfg(
            *EXACT,
            "trainer.epochs=2",
            "trainer.checkpoint_every_steps=2",
            "trainer.keep_last=5",
            "resume=auto",
            "allow_config_change=true",
        ),
        run_dir,
    )
    assert summary["steps"] == 8 and not leftover.exists()


# 7. A resumed epoch's record covers the whole epoch.


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [2, 4])  # mid-epoch, and at the epoch's last step
def test_7_a_resumed_epoch_logs_the_loss_of_the_whole_epoch(
    tiny_cfg, tmp_path, monkeypatch, stop_at
):
    reference = train(tiny_cfg(*EXACT, "trainer.epochs=1"), tmp_path / "reference")
    original = AsymmetricLoss.forward
    calls = {"n": 0}

    def forward(self, logits, targets):
        calls["n"] += 1
        if calls["n"] == stop_at:
            signal.raise_signal(signal.SIGTERM)
        return original(self, logits, targets)

    monkeypatch.setattr(AsymmetricLoss, "forward", forward)
    assert train(tiny_cfg(*EXACT, "trainer.epochs=1"), tmp_path / "run")["status"] == "preempted"
    monkeypatch.undo()
    resumed = train(tiny_cfg(*EXACT, "trainer.epochs=1", "resume=auto"), tmp_path / "run")
    expected, got = reference["final"]["metrics"], resumed["final"]["metrics"]
    assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6)
    assert got["train_images_per_sec"] > 0 and got["mAP"] == expected["mAP"]


# 8. Values that cannot work fail at start, naming the key.


@pytest.mark.parametrize(
    "override",
    [
        "trainer.epochs=0",
        "trainer.epochs=-1",
        "trainer.limit_train_batches=0",
        "dataset.batch_size=0",
        "dataset.image_size=0",
        "dataset.max_bad_fraction=1.5",
        "trainer.limit_val_batches=0",
    ],
)
def test_8_impossible_values_fail_at_start_naming_the_key(
    tiny_cfg, tmp_path, monkeypatch, override
):
    fail_if_called(monkeypatch, train_module, "build_datasets", "data was read")
    key = override.split("=")[0]
    with pytest.raises(ConfigValueError, match=f"{key}="):
        train(tiny_cfg(override), tmp_path / "run")
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_8_a_possible_value_reaches_the_data(tiny_cfg, tmp_path, monkeypatch):
    """The positive control of the test above: its sentinel is on the path train() takes."""
    fail_if_called(monkeypatch, train_module, "build_datasets", "data was read")
    with pytest.raises(SENTINEL, match="data was read"):
        train(tiny_cfg("trainer.epochs=1"), tmp_path / "run")


def test_8_validate_data_refuses_impossible_values(digits_root, capsys):
    assert (
        validate_main(
            ["experiment=demo", f"dataset.root={digits_root}", "dataset.max_bad_fraction=-1"]
        )
        == 2
    )
    assert "dataset.max_bad_fraction=-1" in capsys.readouterr().err


# 9. A full disk says so, naming the file; the previous checkpoint survives: save_checkpoint's own
# tests, in tests/test_checkpoint.py (test_9_*).


# 10. One process per run directory; a dead holder does not block.


def test_10_a_second_process_on_a_live_run_is_refused(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / LOCK_NAME, "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("q2l pid 4242 on node7")
        holder.flush()
        with pytest.raises(RunDirError, match="in use by q2l pid 4242 on node7"):
            train(tiny_cfg("trainer.epochs=1", "resume=auto"), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]


@pytest.mark.slow
def test_10_a_lock_held_by_a_killed_process_is_free(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
            ),
            str(run_dir / LOCK_NAME),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert (
        train(tiny_cfg("trainer.epochs=1", "trainer.limit_train_batches=1"), run_dir)["status"]
        == "completed"
    )


# 11. Unwritable output folders are found before any data is read; eval keeps and prints results.


@pytest.fixture
def read_only():
    """read_only(folder): make `folder` unwritable even for root (a read-only bind mount)."""
    mounted = []

    def _make(folder: Path) -> None:
        if os.geteuid() != 0:
            folder.chmod(0o555)
            return
        for args in (["--bind", str(folder), str(folder)], ["-o", "remount,ro,bind", str(folder)]):
            if subprocess.run(["mount", *args], capture_output=True).returncode != 0:
                pytest.skip("cannot make a read-only folder here")
        mounted.append(folder)

    yield _make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.slow
def test_11_a_read_only_checkpoints_folder_fails_before_data_loading(
    tiny_cfg, tmp_path, read_only, monkeypatch
):
    run_dir = tmp_path / "run"
    train(tiny_cfg("trainer.epochs=1"), run_dir)
    resume = tiny_cfg("trainer.epochs=2", "resume=auto", "allow_config_change=true")
    fail_if_called(monkeypatch, train_module, "build_datasets", "data was read")
    with pytest.raises(SENTINEL, match="data was read"):  # positive control: writable, it reads
        train(resume, run_dir)
    read_only(run_dir / "checkpoints")
    with pytest.raises(RunDirError, match=r"checkpoints is not writable"):
        train(resume, run_dir)


@pytest.mark.slow
def test_11_eval_prints_its_metrics_when_it_cannot_write_and_never_overwrites(
    finished_run, cli_env, tmp_path, read_only, compose_config
):
    import shutil

    from q2l.evaluation.evaluate import evaluate_checkpoint, output_dir, write_results

    checkpoint_dir = tmp_path / "ckpts"
    checkpoint_dir.mkdir()
    shutil.copy(finished_run / "checkpoints" / "best.pt", checkpoint_dir / "best.pt")
    for _ in range(2):  # two evaluations, as eval.py writes them
        cfg = compose_config("eval", [f"ckpt={checkpoint_dir / 'best.pt'}"])
        write_results(evaluate_checkpoint(cfg), output_dir(cfg))
    assert len(list(checkpoint_dir.glob("eval-best-*/eval.json"))) == 2  # one folder per evaluation

    before = _tree(checkpoint_dir)
    read_only(checkpoint_dir)
    third = run_python(["eval.py", f"ckpt={checkpoint_dir / 'best.pt'}"], cli_env)
    assert third.returncode == 1
    assert "mAP" in third.stdout and "nine" in third.stdout  # the metrics were printed
    assert "could not be written" in third.stdout + third.stderr
    assert _tree(checkpoint_dir) == before


# 12. Clear messages: an unusable checkpoint is refused without suggesting weights_only=False.


class CodeCarrier:
    """Anything a weights_only load refuses: a pickled class instance."""


def test_12_a_code_carrying_checkpoint_is_refused_without_torchs_advice(tmp_path):
    for path, load in [
        (tmp_path / "ckpt.pt", load_checkpoint),
        (tmp_path / "weights.pth", read_state_dict),
    ]:
        torch.save(
            {"format_version": 1, "model": {"w": torch.zeros(1)}, "extra": CodeCarrier()}, path
        )
        with pytest.raises((CheckpointError, WeightsFileError)) as error:
            load(path)
        assert str(path) in str(error.value) and "CodeCarrier" in str(error.value)
        assert "weights_only=False" not in str(error.value) and "weights_only" not in str(
            error.value.__cause__ or ""
        )
