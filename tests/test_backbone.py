"""Backbone weights in their original layouts load equal; the official ResNet training setup
(stem and layer1 frozen, frozen BatchNorm) and its refusals for other architectures."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torchvision
from torch import nn

from q2l.models import TimmBackbone
from q2l.models.backbone import normalization, pretrained_weights_path

from .helpers.layouts import miil_tresnet_layout, randomize

TINY_TRESNET = {"layers": [1, 1, 1, 1], "width_factor": 0.5}
TINY_SWIN = {"embed_dim": 24, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 1, 1)}


def _assert_same_state(loaded: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for key, value in loaded.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)


def test_torchvision_resnet_file_loads_equal(tmp_path):
    # torchvision's own keys, without BatchNorm step counters (files older than PyTorch 0.4.1).
    reference = torchvision.models.resnet18(weights=None)
    randomize(reference)
    state = {k: v for k, v in reference.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "resnet18-f37072fd.pth")
    backbone = TimmBackbone("resnet18", weights=str(tmp_path / "resnet18-f37072fd.pth")).eval()
    trunk = nn.Sequential(*list(reference.children())[:-2]).eval()  # up to layer4
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), trunk(images), rtol=1e-4, atol=1e-5)


def test_miil_tresnet_file_loads_equal(tmp_path):
    source = TimmBackbone("tresnet_m", pretrained=False, timm_kwargs=TINY_TRESNET)
    randomize(source.body)
    original = miil_tresnet_layout(source.body)
    assert "body.layer2.0.conv1.0.0.weight" in original and "body.conv1.1.weight" in original
    original["head.fc.weight"] = torch.zeros(1000, source.num_channels)  # ImageNet classifier
    torch.save({"model": original, "epoch": 300}, tmp_path / "tresnet_m_448.pth")
    loaded = TimmBackbone(
        "tresnet_m", weights=str(tmp_path / "tresnet_m_448.pth"), timm_kwargs=TINY_TRESNET
    )
    _assert_same_state(loaded.body, source.body.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), source.eval()(images))


def test_microsoft_swin_file_loads_equal(tmp_path):
    source = TimmBackbone(
        "swin_tiny_patch4_window7_224", pretrained=False, image_size=224, timm_kwargs=TINY_SWIN
    )
    randomize(source.body)
    # Microsoft's layout: patch merging at the end of a stage (timm: start of the next), a plain
    # `head`, and persistent relative-position indices and attention masks.
    original = {}
    for key, value in source.body.state_dict().items():
        key = re.sub(
            r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", key
        )
        original[key] = value
    for name, buffer in source.body.named_buffers():
        original[name] = buffer
    original["head.weight"] = torch.zeros(21841, source.num_channels)
    original["head.bias"] = torch.zeros(21841)
    assert "layers.0.downsample.reduction.weight" in original
    torch.save({"model": original}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    loaded = TimmBackbone(
        "swin_tiny_patch4_window7_224",
        weights=str(tmp_path / "swin_tiny_patch4_window7_224.pth"),
        image_size=224,
        timm_kwargs=TINY_SWIN,
    )
    _assert_same_state(loaded.body, source.body.state_dict())


def test_official_resnet_setup_freezes_stem_layer1_and_batchnorm():
    plain = TimmBackbone("resnet18", pretrained=False).eval()
    randomize(plain.body)
    frozen = TimmBackbone("resnet18", pretrained=False, freeze="stem_layer1", frozen_bn=True)
    frozen.load_state_dict(plain.state_dict(), strict=False)  # frozen BN has no step counters
    trainable = [k for k, p in frozen.named_parameters() if p.requires_grad]
    assert trainable and all(re.match(r"body\.layer[234]\.", k) for k in trainable)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        train_out = frozen.train()(images)  # training mode neither uses nor updates batch stats
        expected = plain(images)
    # Frozen BN folds mean and variance into one scale and shift: rounding differs slightly.
    torch.testing.assert_close(train_out, expected, rtol=0, atol=1e-4 * expected.abs().max())
    for key, value in frozen.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    stem_only = TimmBackbone("tresnet_m", pretrained=False, freeze="stem", timm_kwargs=TINY_TRESNET)
    frozen_keys = [k for k, p in stem_only.named_parameters() if not p.requires_grad]
    assert frozen_keys and all(k.startswith("body.body.conv1.") for k in frozen_keys)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"freeze": "stem_layer1"}, "no ResNet-style stages"),
        ({"frozen_bn": True}, "no BatchNorm layers"),
        ({"freeze": "layer3"}, "choose one of"),
        ({"normalization": "coco"}, "choose one of"),
    ],
)
def test_options_that_do_not_fit_the_architecture_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TimmBackbone("vit_small_patch16_224", pretrained=False, image_size=32, **options)


def test_normalization_choices():
    assert normalization("tresnet_l") == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert normalization("tresnet_l", "imagenet")[0] == pytest.approx((0.485, 0.456, 0.406))
    assert normalization("resnet101", "none") == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


# Pretrained weights without a file: timm's hub weights through the Hugging Face hub client.


def _hub_cache_with(tmp_path, name: str) -> tuple[dict[str, torch.Tensor], object]:
    """A Hugging Face cache laid out as the hub client lays it out, holding timm's weights file
    for `name` (random weights of the right shapes); returns (the weights, the cache folder)."""
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    weights = timm.create_model(name, pretrained=False).state_dict()
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "hf" / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    save_file(
        {k: v.contiguous() for k, v in weights.items()},
        folder / "snapshots" / commit / "model.safetensors",
    )
    return weights, tmp_path / "hf"


def test_hub_weights_are_found_in_the_hub_clients_cache_offline(tmp_path, monkeypatch):
    weights, cache = _hub_cache_with(tmp_path, "resnet18")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = TimmBackbone("resnet18", pretrained=True)
    loaded = backbone.body.state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in loaded)


def test_offline_and_uncached_fails_naming_the_hub_file_and_where_to_place_it(
    tmp_path, monkeypatch, tiny_cfg
):
    from q2l.training.run import train

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = (
        r"weights of 'resnet18' are not on this machine and HF_HUB_OFFLINE is set[\s\S]*"
        r"scripts/fetch_weights.py --backbones resnet18[\s\S]*timm/resnet18.a1_in1k/"
        r"model.safetensors[\s\S]*HF_HUB_CACHE=DIR \(now .*empty-cache\)"
    )
    with pytest.raises(FileNotFoundError, match=message):
        TimmBackbone("resnet18", pretrained=True)
    # In a run, before the data is read (the data root does not even exist).
    cfg = tiny_cfg(
        "backbone.name=resnet18",
        "backbone.pretrained=true",
        "dataset.root=/nonexistent/data",
        "~prepare.data",
    )
    with pytest.raises(FileNotFoundError, match=message):
        train(cfg, tmp_path / "run")


def test_missing_hub_weights_are_downloaded_by_the_hub_client(tmp_path, monkeypatch):
    import huggingface_hub

    weights, cache = _hub_cache_with(tmp_path, "resnet18")
    [stored] = cache.rglob("model.safetensors")
    calls = []

    def download(repo, filename, revision=None, cache_dir=None):
        calls.append((repo, filename, cache_dir))
        return str(stored)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # not cached there
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert pretrained_weights_path("resnet18", None) == stored
    assert calls == [("timm/resnet18.a1_in1k", "model.safetensors", str(tmp_path / "elsewhere"))]


@pytest.mark.slow  # composes every preset (2 s)
def test_the_fetch_script_names_every_presets_weights_and_fills_a_cache_folder(
    tmp_path, monkeypatch, capsys
):
    import runpy

    import huggingface_hub

    from .conftest import REPO_ROOT

    script = runpy.run_path(str(REPO_ROOT / "scripts" / "fetch_weights.py"))
    assert script["main"](["--list"]) == 0
    listed = capsys.readouterr().out
    for preset in ("coco_r101_448", "coco_tresnetl_448", "coco_swinl_384", "coco_tresnetl22k_448"):
        assert preset in listed
    assert "timm/tresnet_l.miil_in1k_448/model.safetensors" in listed

    weights, cache = _hub_cache_with(tmp_path, "resnet18")
    [stored] = cache.rglob("model.safetensors")
    calls = []
    monkeypatch.setattr(
        huggingface_hub,
        "hf_hub_download",
        lambda repo, filename, revision=None, cache_dir=None: (
            calls.append(cache_dir) or str(stored)
        ),
    )
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    target = tmp_path / "for-the-cluster"
    assert script["main"](["--backbones", "resnet50", "--cache-dir", str(target)]) == 0
    assert calls == [str(target.resolve())]
