"""What an official Query2Label run recorded about itself: the JSON config beside its checkpoint.

The official training script (SlongLiu/query2labels main_mlc.py) dumps its argparse namespace as
`config.json` in its output folder, and each released model ships a `config_new.json` beside its
`checkpoint.pkl`, which `q2l_infer.py` loads back onto its argument defaults. Both use the argument
names, of which the ones that decide how the weights must be run are:

    backbone          resnet101, tresnetl, tresnetl_v2, tresnetxl, swin_L_384_22k, CvT_w24, ...
    img_size          training (and evaluation) resolution
    orid_norm         true: inputs normalised with mean 0 / std 1; false or absent: ImageNet's
    nheads, dropout   transformer settings the weights do not reveal
    hidden_dim, dim_feedforward, enc_layers, dec_layers, keep_input_proj,
    keep_first_self_attn_dec, keep_other_self_attn_dec, pre_norm, num_class

A field a file lacks takes the official argument default (orid_norm false, nheads 4, dropout 0.1,
pre_norm false, ...), as `q2l_infer.py` would. `q2l-import` reads this file to set the
normalisation, image size and transformer settings of the imported model; the weights themselves
fix the sizes (q2l.models.official).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Looked for beside a checkpoint, in this order: the release's file, then a training run's dump.
CONFIG_NAMES = ("config_new.json", "config.json")

# The official `--backbone` choices as timm models (the weights the official code loads for them).
OFFICIAL_BACKBONES: dict[str, str] = {
    "resnet18": "resnet18.tv_in1k",
    "resnet34": "resnet34.tv_in1k",
    "resnet50": "resnet50.tv_in1k",
    "resnet101": "resnet101.tv_in1k",
    "tresnetl": "tresnet_l.miil_in1k_448",
    "tresnetxl": "tresnet_xl.miil_in1k_448",
    "tresnetl_v2": "tresnet_v2_l.miil_in21k",
    "swin_B_224_22k": "swin_base_patch4_window7_224.ms_in22k",
    "swin_B_384_22k": "swin_base_patch4_window12_384.ms_in22k",
    "swin_L_224_22k": "swin_large_patch4_window7_224.ms_in22k",
    "swin_L_384_22k": "swin_large_patch4_window12_384.ms_in22k",
}
CVT_UNSUPPORTED = (
    "CvT backbones are not supported: q2l builds every backbone with timm, which has no CvT model "
    "(the official code carries Microsoft's CvT implementation), so the network these weights "
    "belong to cannot be built"
)
# Official backbones q2l cannot build, and why.
UNSUPPORTED_BACKBONES: dict[str, str] = {"CvT_w24": CVT_UNSUPPORTED}

# Official argument defaults (main_mlc.py) for the fields q2l reads.
_DEFAULTS: dict[str, Any] = {
    "orid_norm": False,
    "nheads": 4,
    "dropout": 0.1,
    "pre_norm": False,
    "keep_input_proj": False,
    "keep_first_self_attn_dec": False,
    "keep_other_self_attn_dec": False,
}
_TYPES: dict[str, type | tuple[type, ...]] = {
    "backbone": str,
    "img_size": int,
    "num_class": int,
    "orid_norm": bool,
    "hidden_dim": int,
    "dim_feedforward": int,
    "enc_layers": int,
    "dec_layers": int,
    "nheads": int,
    "dropout": (int, float),
    "pre_norm": bool,
    "keep_input_proj": bool,
    "keep_first_self_attn_dec": bool,
    "keep_other_self_attn_dec": bool,
}


@dataclass(frozen=True)
class OfficialRunConfig:
    """The fields of an official run's config that q2l uses.

    `recorded` holds the fields the file itself has (others are the official defaults); `get`
    answers with the default where the file is silent.
    """

    path: Path
    recorded: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        return self.recorded.get(name, _DEFAULTS.get(name))

    def has(self, name: str) -> bool:
        return name in self.recorded

    @property
    def normalization(self) -> str:
        """The `backbone.normalization` the run's inputs had: "none" (mean 0 / std 1) with
        orid_norm, else "imagenet"."""
        return "none" if self.get("orid_norm") else "imagenet"

    @property
    def decoder_self_attention(self) -> str:
        """The run's decoder self-attention flags as a q2l `decoder_self_attention` choice."""
        first, rest = self.get("keep_first_self_attn_dec"), self.get("keep_other_self_attn_dec")
        return {(False, False): "none", (True, False): "first", (False, True): "rest"}.get(
            (first, rest), "all"
        )

    def timm_backbone(self) -> str | None:
        """The timm model of the run's backbone; None when the file names none. Raises
        ValueError for a backbone q2l cannot build or does not know."""
        name = self.recorded.get("backbone")
        if name is None:
            return None
        if name in UNSUPPORTED_BACKBONES:
            raise ValueError(f"{self.path}: backbone {name}: {UNSUPPORTED_BACKBONES[name]}")
        if name not in OFFICIAL_BACKBONES:
            raise ValueError(
                f"{self.path}: backbone {name!r} is not one the official code builds "
                f"({', '.join(sorted(OFFICIAL_BACKBONES))})"
            )
        return OFFICIAL_BACKBONES[name]


def find_official_config(checkpoint: str | Path, given: str | Path | None = None) -> Path | None:
    """`given`, else the first of CONFIG_NAMES beside `checkpoint`; None when there is none.

    Raises FileNotFoundError when `given` does not exist.
    """
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"official config {path}: no such file")
        return path
    folder = Path(checkpoint).expanduser().parent
    return next((folder / n for n in CONFIG_NAMES if (folder / n).is_file()), None)


def read_official_config(path: str | Path) -> OfficialRunConfig:
    """The known fields of the JSON config at `path`, type-checked; other fields are ignored.

    Raises ValueError for a file that is not a JSON object or a field of the wrong type.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"official config {path} cannot be read as JSON ({error})") from None
    if not isinstance(content, dict):
        raise ValueError(f"official config {path} holds a {type(content).__name__}, not an object")
    recorded = {}
    for name, kind in _TYPES.items():
        if name not in content or content[name] is None:
            continue
        value = content[name]
        # JSON has no int/bool distinction to rely on: true is not a number here, 1 not a flag.
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise ValueError(f"official config {path}: {name}={value!r} is not a {_kind(kind)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"official config {path}: {name}={value!r} is not finite")
        recorded[name] = value
    return OfficialRunConfig(path=path, recorded=recorded)


def _kind(kind: type | tuple[type, ...]) -> str:
    return (
        "number"
        if isinstance(kind, tuple)
        else {bool: "true/false", int: "whole number"}.get(kind, "string")
    )
