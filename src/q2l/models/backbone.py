"""Backbones: any timm model, cut before its pooling, returning a spatial feature map.

timm is the backbone registry: `name` is any `timm.list_models()` entry. CNNs give (B, C, H, W)
directly; token models (ViT, DeiT, Swin, ...) are reshaped to a map so the Query2Label head sees
the same thing whatever the backbone. `pretrained=True` loads a local file (`weights=...`), else
timm's own hub weights of `name` through the Hugging Face hub client: from its cache when they are
there, else downloaded into it (honouring HF_HUB_OFFLINE=1: then a clear error says which file to
place where; scripts/fetch_weights.py fills a cache for machines without internet). A file in its
original layout (torchvision ResNet, Alibaba-MIIL TResNet, Microsoft Swin, ...) goes through the
conversion timm applies to its own hub weights (`checkpoint_filter_fn` of the model's timm module).

For ResNet-like models (stages named layer1 ... layer4) the official Query2Label backbone's
training setup is available: `freeze="stem_layer1"` keeps the stem and the first stage fixed, and
`frozen_bn=True` turns every BatchNorm into a fixed affine map (statistics and scale never change).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn

from q2l.models.weights import read_state_dict
from q2l.utils.errors import ConfigError, InputError

log = logging.getLogger(__name__)

FREEZE_CHOICES = ("none", "stem", "stem_layer1")
NORMALIZATION_CHOICES = ("pretrained", "imagenet", "none")


class TimmBackbone(nn.Module):
    """A timm model without classifier and pooling.

    forward: images (B, 3, H, W) -> features (B, C, H', W'), C = `num_channels`.

    Args:
        name: timm model name, e.g. "resnet101", "tresnet_l", "vit_small_patch16_224".
        pretrained: load pretrained weights (from `weights`, else timm's hub weights from the
            Hugging Face cache, downloaded there if missing and allowed). Query2Label is trained
            from a pretrained backbone, hence the default.
        weights: path to a local .pth/.pt/.safetensors state dict for this model.
        image_size: input size for models that need it fixed at build time (ViT, Swin).
        freeze: "none"; "stem" or "stem_layer1" keep the parameters before layer1 (or before
            layer2) out of training, as the official Query2Label backbone does with
            "stem_layer1". ResNet-like models only (stages named layer1 ... layer4).
        frozen_bn: replace every BatchNorm by a frozen one (fixed statistics and affine, no
            parameters), as the official Query2Label ResNet does. Models with BatchNorm only.
        normalization: input mean/std the data pipeline uses (`normalization()`): "pretrained"
            (what the weights were trained with, from timm's config), "imagenet", or "none"
            (mean 0, std 1).
        timm_kwargs: more `timm.create_model` arguments (drop_path_rate, output_stride, ...).
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = True,
        weights: str | None = None,
        image_size: int | None = None,
        freeze: str = "none",
        frozen_bn: bool = False,
        normalization: str = "pretrained",
        timm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise ConfigError(
                f"backbone.name={name!r} is not a timm model; see timm.list_models() for choices"
            )
        if freeze not in FREEZE_CHOICES:
            raise ConfigError(f"backbone.freeze={freeze!r}: choose one of {FREEZE_CHOICES}")
        if normalization not in NORMALIZATION_CHOICES:
            raise ConfigError(
                f"backbone.normalization={normalization!r}: choose one of {NORMALIZATION_CHOICES}"
            )
        kwargs = _plain(timm_kwargs or {})  # timm wants tuples/lists, not config containers
        if image_size is not None and _needs_image_size(name):
            kwargs.setdefault("img_size", image_size)
        self.body = timm.create_model(
            name, pretrained=False, num_classes=0, global_pool="", **kwargs
        )
        self.name = name
        self.num_channels: int = self.body.num_features
        # Token models keep some leading tokens (class/register) that are not part of the grid.
        self.num_prefix_tokens: int = getattr(self.body, "num_prefix_tokens", 0)
        self.output_fmt: str = getattr(self.body, "output_fmt", "NCHW")
        if pretrained:
            load_pretrained(self.body, name, weights)
        if frozen_bn:
            self.body = _freeze_batch_norm(self.body, name)
        if freeze != "none":
            _freeze_stem(self.body, name, through_layer1=freeze == "stem_layer1")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.body.forward_features(images)
        if features.ndim == 3:  # (B, N, C) tokens -> (B, C, H', W')
            features = features[:, self.num_prefix_tokens :]
            height, width = _token_grid(self.body, images.shape[-2:], features.shape[1])
            features = features.transpose(1, 2).reshape(features.shape[0], -1, height, width)
        elif self.output_fmt == "NHWC":  # Swin and friends keep channels last
            features = features.permute(0, 3, 1, 2)
        return features


def _plain(value: Any) -> Any:
    """Mappings and sequences (a config's DictConfig/ListConfig too) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(item) for item in value]
    return value


def normalization(
    name: str, mode: str = "pretrained"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for the inputs of timm model `name` (a backbone's `normalization` option).

    "pretrained": what its pretrained weights expect (TResNet: 0 and 1), read from timm's
    pretrained config, so it is known before the model is built; "imagenet": ImageNet's;
    "none": 0 and 1.
    """
    if mode == "imagenet":
        return timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    if mode == "none":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is None:
        return timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    return tuple(pretrained_cfg.mean), tuple(pretrained_cfg.std)


def _needs_image_size(name: str) -> bool:
    """True for architectures whose position embeddings are sized at construction."""
    return any(key in name for key in ("vit", "deit", "swin", "beit", "eva", "cait", "xcit"))


def _token_grid(body: nn.Module, image_hw: torch.Size, num_tokens: int) -> tuple[int, int]:
    """Height and width of the patch grid that produced `num_tokens` tokens."""
    patch_embed = getattr(body, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if patch is not None:
        height, width = image_hw[0] // patch[0], image_hw[1] // patch[1]
        if height * width == num_tokens:
            return height, width
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"cannot reshape {num_tokens} tokens into a square feature map")
    return side, side


def pretrained_weights_path(name: str, weights: str | None) -> Path:
    """The weights file for timm `name`: `weights`, or (when it is empty) timm's hub weights in
    the Hugging Face cache, downloaded there first if they are missing and the network is allowed.

    A missing file gives an error that says which file to supply and how.
    """
    if weights:
        path = Path(os.path.expanduser(weights))
        if not path.is_file():
            raise FileNotFoundError(
                f"backbone.weights={weights!r}: no such file. Supply the pretrained weights of "
                f"{name!r} as a local .pth/.safetensors state dict, leave backbone.weights empty "
                "to use timm's hub weights, or train from scratch with backbone.pretrained=false"
            )
        return path
    return cached_weights(name) or download_weights(name)


def download_weights(name: str, cache_dir: str | Path | None = None) -> Path:
    """timm's hub weights of `name` in the Hugging Face cache (`cache_dir`, else HF_HUB_CACHE /
    HF_HOME's), downloaded by the hub client unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, revision, filenames = hub_source(name)
    cache = str(cache_dir or hub_cache_dir())
    if hub_offline():
        raise FileNotFoundError(
            f"backbone.pretrained=true: the weights of {name!r} are not on this machine and "
            f"HF_HUB_OFFLINE is set, so they cannot be downloaded. {_how_to_place(name, cache)}"
        )
    log.info("backbone %s: downloading %s/%s into %s", name, repo, filenames[0], cache)
    for filename in filenames:
        try:
            found = hf_hub_download(repo, filename, revision=revision, cache_dir=cache)
        except EntryNotFoundError:
            continue  # the repository has the weights under the next name
        except Exception as error:  # no network, a proxy, a gated repository, ...
            reason = str(error).strip().splitlines()[0]
            raise FileNotFoundError(
                f"backbone.pretrained=true: downloading the weights of {name!r} failed "
                f"({type(error).__name__}: {reason}). {_how_to_place(name, cache)}"
            ) from None
        return Path(found)
    raise FileNotFoundError(f"{repo} holds none of {filenames}: timm's hub entry for {name!r}")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as the hub client reads it (1/ON/YES/TRUE), read now, not at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """Where the Hugging Face hub client keeps downloads: HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub (read now, so a changed environment is seen)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_source(name: str) -> tuple[str, str | None, list[str]]:
    """(repository, revision, file names to try) of timm's hub weights for `name`."""
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
    if not hub_id:
        raise FileNotFoundError(
            f"backbone.pretrained=true: timm has no pretrained weights for {name!r} on the "
            "Hugging Face hub. Pass backbone.weights=/path/to/file.pth|.safetensors, or train "
            "from scratch with backbone.pretrained=false"
        )
    repo, _, revision = hub_id.partition("@")
    filenames = (
        [pretrained_cfg.hf_hub_filename]
        if pretrained_cfg.hf_hub_filename
        else ["model.safetensors", "pytorch_model.bin"]  # timm's names, safetensors preferred
    )
    return repo, revision or None, filenames


def _how_to_place(name: str, cache: str) -> str:
    repo, _, filenames = hub_source(name)
    return (
        f"On a machine with internet, `python scripts/fetch_weights.py --backbones {name} "
        f"--cache-dir DIR` downloads {repo}/{filenames[0]}; copy DIR here and set "
        f"HF_HUB_CACHE=DIR (now {cache}). Or pass backbone.weights=/path/to/file.pth|"
        ".safetensors, or train from scratch with backbone.pretrained=false"
    )


def load_pretrained(body: nn.Module, name: str, weights: str | None) -> None:
    """Load backbone weights from a local file or timm's hub weights (pretrained_weights_path)."""
    path = pretrained_weights_path(name, weights)
    state = convert_state_dict(read_state_dict(path), body, name)
    classifier = body.default_cfg.get("classifier")
    state = {k: v for k, v in state.items() if not (classifier and k.startswith(classifier))}
    try:
        missing, unexpected = body.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise InputError(f"backbone weights {str(path)!r} do not fit {name}: {error}") from error
    # Files saved before PyTorch 0.4.1 (torchvision's ResNets) or by inplace_abn (TResNet) have no
    # BatchNorm step counters; they only matter for momentum=None, which no timm model uses.
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing:
        raise InputError(
            f"backbone weights {str(path)!r} do not fit {name}: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}"
        )
    log.info("backbone %s: loaded %s (%d unused keys)", name, path, len(unexpected))


def convert_state_dict(
    state: dict[str, torch.Tensor], body: nn.Module, name: str
) -> dict[str, torch.Tensor]:
    """`state` in timm's layout for `body` (timm model `name`): original-layout checkpoints
    (Microsoft Swin, Alibaba-MIIL TResNet with inplace_abn, ...) go through the conversion timm
    applies to its own hub weights, the `checkpoint_filter_fn` of the model's timm module; models
    without one (ResNet: torchvision's keys are timm's) are returned unchanged."""
    module = importlib.import_module(timm.models.model_entrypoint(name).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None)
    return dict(convert(state, body)) if convert is not None else state


def _freeze_batch_norm(body: nn.Module, name: str) -> nn.Module:
    """`body` with every BatchNorm2d (and timm BatchNormAct2d) frozen: fixed statistics and affine
    as buffers, so neither training nor `train()` mode changes them."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in body.modules()):
        raise ConfigError(
            f"backbone.frozen_bn=true: {name} has no BatchNorm layers to freeze (it normalises "
            "with LayerNorm or GroupNorm); use frozen_bn=false"
        )
    return freeze_batch_norm_2d(body)


def _freeze_stem(body: nn.Module, name: str, through_layer1: bool) -> None:
    """Exclude from training the parameters registered before the stage after the stem (layer1),
    or after the first stage (layer2) with `through_layer1` (the official Query2Label setup)."""
    first_trained = "layer2" if through_layer1 else "layer1"
    parameters = list(body.named_parameters())
    starts = [
        index
        for index, (key, _) in enumerate(parameters)
        if re.search(rf"(^|\.){first_trained}\.", key)
    ]
    if not starts:
        raise ConfigError(
            f"backbone.freeze={'stem_layer1' if through_layer1 else 'stem'}: {name} has no "
            "ResNet-style stages (layer1 ... layer4); freezing by stage is defined for "
            "ResNet-like timm models (resnet*, resnext*, tresnet*, ...). Use backbone.freeze=none"
        )
    for _, parameter in parameters[: starts[0]]:
        parameter.requires_grad_(False)


def cached_weights(name: str) -> Path | None:
    """The file timm would load for `name` if it is already on disk (Hugging Face or torch hub
    cache); looked up without any network access."""
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is None:
        return None
    if pretrained_cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, revision, filenames = hub_source(name)
        for filename in filenames:
            found = try_to_load_from_cache(
                repo, filename, cache_dir=str(hub_cache_dir()), revision=revision
            )
            if isinstance(found, str):
                return Path(found)
    if pretrained_cfg.url:
        candidate = (
            Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(pretrained_cfg.url).path).name
        )
        if candidate.is_file():
            return candidate
    return None
