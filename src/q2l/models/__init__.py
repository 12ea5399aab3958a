"""Model zoo: timm backbones under classification heads.

A head is a module `Head(backbone, num_classes, **options)` mapping images to logits (B, K), in
one file of this folder; `HEAD_CLASSES` lists them (docs/heads.md: add a head in 3 steps). Its
config schema (conf/model/*.yaml) is read from its signature by `q2l.config`.

Training builds models with `hydra.utils.instantiate` from the composed config. A checkpoint's
config is file input: `MODEL_TARGETS` lists what may be rebuilt from one
(`q2l.training.build.instantiate_allowed`), so a `_target_` read from a file is never imported
otherwise.
"""

from __future__ import annotations

from torch import nn

from q2l.models.backbone import TimmBackbone
from q2l.models.baseline import GlobalPoolLinear
from q2l.models.ml_decoder import MLDecoder
from q2l.models.query2label import Query2Label

# Every head a config may name; its schema is registered as /schema/model/<file name>.
HEAD_CLASSES: tuple[type[nn.Module], ...] = (Query2Label, GlobalPoolLinear, MLDecoder)

# Heads under their qualified names (and the short alias of q2l 0.1).
HEADS: dict[str, type[nn.Module]] = {
    **{f"{head.__module__}.{head.__qualname__}": head for head in HEAD_CLASSES},
    "q2l.models.Query2Label": Query2Label,
}
MODEL_TARGETS: dict[str, type[nn.Module]] = {
    **HEADS,
    "q2l.models.backbone.TimmBackbone": TimmBackbone,
}

__all__ = [
    "HEADS",
    "HEAD_CLASSES",
    "MODEL_TARGETS",
    "GlobalPoolLinear",
    "MLDecoder",
    "Query2Label",
    "TimmBackbone",
]
