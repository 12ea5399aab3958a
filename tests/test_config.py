"""Every config group composes, instantiates, and bad overrides fail at composition."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from q2l.config import CONFIG_DIR
from q2l.config.checks import check_values
from q2l.losses import AsymmetricLoss, BCEWithLogitsLoss, PartialAsymmetricLoss
from q2l.training.build import build_model

from .test_presets import PRESETS as PAPER_PRESETS

CONF = Path(CONFIG_DIR)
# backbone=<option>: its timm name, as conf/backbone/<option>.yaml gives it.
BACKBONES = {p.stem: OmegaConf.load(p).name for p in sorted((CONF / "backbone").glob("*.yaml"))}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# backbone and loss: test_every_backbone_builds and test_losses_instantiate compose every option;
# the paper presets: test_presets composes, checks and builds each.
@pytest.mark.parametrize(
    "group", ["model", "dataset", "augment", "optimizer", "schedule", "experiment"]
)
def test_every_option_composes_and_passes_the_value_checks(compose_config, group):
    for option in _options(group):
        if group == "experiment" and option in PAPER_PRESETS:
            continue
        # Presets pick their data set; the small setup (like the other groups) is for any.
        picks_data = group == "dataset" or (group == "experiment" and option != "small")
        data = [] if picks_data else ["dataset=coco2014"]
        cfg = compose_config("train", [f"{group}={option}", *data, "dataset.root=/nonexistent"])
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        check_values(cfg)  # no infinite or NaN number anywhere (test_checks)


def test_eval_config_composes(compose_config):
    cfg = compose_config("eval", ["ckpt=some/best.pt"])
    assert cfg.ckpt == "some/best.pt" and cfg.dataset is None
    cfg = compose_config("eval", ["ckpt=x.pt", "dataset=coco2014", "dataset.root=/data/coco"])
    assert cfg.dataset.name == "coco2014"


@pytest.mark.parametrize("option", _options("loss"))
def test_losses_instantiate(compose_config, option):
    loss_fn = instantiate(compose_config("train", [f"loss={option}", "dataset=digits"]).loss)
    expected = {
        "asl": AsymmetricLoss,
        "partial_asl": PartialAsymmetricLoss,
        "bce": BCEWithLogitsLoss,
    }[option]
    assert isinstance(loss_fn, expected)
    targets = torch.tensor([[1.0, 0.0, -1.0]])
    assert torch.isfinite(
        loss_fn(torch.randn(1, 3), targets if option != "asl" else targets.clamp(min=0))
    )


@pytest.mark.parametrize("schedule", _options("schedule"))
def test_optimizer_and_schedules_instantiate(compose_config, schedule):
    cfg = compose_config("train", [f"schedule={schedule}", "dataset=digits"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = instantiate(cfg.optimizer)(model)
    decays = sorted(group["weight_decay"] for group in optimizer.param_groups)
    assert decays == [0.0, cfg.optimizer.weight_decay]  # norms and biases are not decayed
    scheduler = instantiate(cfg.schedule)(optimizer, total_steps=20, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(cfg.optimizer.lr, rel=0.05)
    assert lrs[-1] < 0.05 * cfg.optimizer.lr  # decays to (nearly) nothing


# One CNN, one TResNet and one token backbone stay in `make test-fast`; the rest (0.3-0.7 s each:
# Swin-L and TResNet build even on the meta device) run in `make test`.
FAST_BACKBONES = {"resnet50", "tresnet_l", "vit_small"}


@pytest.mark.parametrize(
    "backbone",
    [
        pytest.param(name, marks=() if name in FAST_BACKBONES else pytest.mark.slow)
        for name in sorted(BACKBONES)
    ],
)
def test_every_backbone_builds(compose_config, backbone):
    size = 384 if "384" in BACKBONES[backbone] else 224
    cfg = compose_config(
        "train",
        [
            f"backbone={backbone}",
            "dataset=digits",
            "model.hidden_dim=32",
            "model.ffn_dim=32",
            "backbone.pretrained=false",
            f"dataset.image_size={size}",
        ],
    )
    with torch.device("meta"):  # structure only: Swin-L and TResNet build in a second
        model = build_model(OmegaConf.to_container(cfg, resolve=True), num_classes=3)
    assert model.backbone.num_channels > 0 and cfg.backbone.name == BACKBONES[backbone]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.gamma_neg=abc", "could not be converted to Float"),
        ("loss.gamma_negg=2", "gamma_negg"),
        ("trainer.precision=fp64", "fp64"),
        ("trainer.epochs=many", "many"),
        ("epochs=3", "epochs"),
        ("backbone=resnet9000", "Could not find 'backbone/resnet9000'"),
    ],
)
def test_bad_overrides_fail_at_composition(compose_config, override, message):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("train", ["dataset=digits", override])
    text = str(error.value) + str(error.value.__cause__)
    assert message in text


def test_experiment_sets_paper_settings_and_cli_still_wins(compose_config):
    cfg = compose_config("train", ["experiment=coco_r101_448"])
    assert cfg.backbone.name == "resnet101.tv_in1k" and cfg.model.hidden_dim == 2048
    assert (
        cfg.dataset.image_size == 448
        and cfg.loss.gamma_neg == 2
        and cfg.trainer.ema_decay == 0.9997
    )
    cfg = compose_config("train", ["experiment=coco_r101_448", "backbone=tresnet_l"])
    assert cfg.backbone.name == "tresnet_l"


def test_tresnet_uses_its_own_normalization():
    from q2l.models.backbone import normalization

    assert normalization("tresnet_l") == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert normalization("resnet101")[0] == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (["experiment=demo"], "_demo_resnet10t_q2l_small"),
        (
            ["dataset=coco2014", "backbone=resnet101", "model=ml_decoder"],
            "_coco2014_resnet101_ml_decoder",
        ),
        (["experiment=coco_r101_448"], "_coco_r101_448_resnet101_tv_q2l"),
    ],
)
def test_run_directories_are_named_for_what_ran(overrides, name):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", [*overrides, "paths.output_dir=/runs"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    run_dir = cfg.hydra.run.dir
    assert run_dir.startswith("/runs/") and run_dir.endswith(name), run_dir
    assert cfg.hydra.sweep.dir.startswith("/runs/multirun/") and cfg.hydra.sweep.dir.endswith(name)


@pytest.mark.slow
def test_debug_presets_shorten_a_run(compose_config, digits_root, tmp_path):
    from q2l.training.run import train

    from .conftest import tiny_overrides

    # The tiny data set's settings, less its epoch count: a preset's values lose to the command's.
    tiny = [o for o in tiny_overrides(digits_root, tmp_path / "cache") if "epochs" not in o]
    fast = train(compose_config("train", [*tiny, "debug=fast"]), tmp_path / "fast")
    assert (fast["epochs_run"], fast["steps"]) == (1, 2)
    limit = compose_config("train", [*tiny, "debug=limit"])
    assert (limit.trainer.epochs, limit.trainer.limit_train_batches) == (2, 20)
    # The tiny test backbone learns one batch by heart in 12 steps at a higher learning rate.
    overfit_cfg = compose_config(
        "train", [*tiny, "debug=overfit", "trainer.epochs=12", "optimizer.lr=1e-2"]
    )
    overfit = train(overfit_cfg, tmp_path / "overfit")
    losses = [r["train_loss"] for r in _records(tmp_path / "overfit")]
    assert overfit["steps"] == 12 and losses[-1] < 0.5 * losses[0]  # one batch, learnt by heart


def _records(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_small_setup_fits_own_data_on_a_cpu(compose_config):
    cfg = compose_config(
        "train", ["dataset=table", "dataset.root=/data/kitchen", "experiment=small"]
    )
    assert (cfg.backbone.name, cfg.model.hidden_dim, cfg.dataset.image_size) == (
        "resnet18",
        256,
        224,
    )
    assert (cfg.dataset.batch_size, cfg.trainer.epochs, cfg.augment.hflip) == (16, 20, 0.5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("experiment=demo loss.gamma_neg=abc", "could not be converted to Float"),
        ("dataset=imagenet22k", "Available options"),
        ("dataset.root=/data/my_coco", "You must specify 'dataset'"),
    ],  # forgot dataset=: nothing runs
)
def test_a_bad_override_is_refused_with_hydras_message(compose_config, override, message):
    with pytest.raises(HydraException) as refused:
        compose_config("train", override.split())
    # What the command line prints: the error and its cause (Hydra's own report).
    assert message in f"{refused.value}\n{refused.value.__cause__}"
