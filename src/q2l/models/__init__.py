"""Model zoo: timm backbones under Query2Label heads.

Training builds models with `hydra.utils.instantiate` from the composed config. A checkpoint's
config is file input: `MODEL_TARGETS` lists what may be rebuilt from one
(`q2l.config.instantiate_allowed`), so a `_target_` read from a file is never imported otherwise.
"""

from __future__ import annotations

from torch import nn

from q2l.models.backbone import TimmBackbone
from q2l.models.query2label import Query2Label

# Heads a config may name, under their qualified names (and the short alias of q2l 0.1).
HEADS: dict[str, type[nn.Module]] = {
    "q2l.models.query2label.Query2Label": Query2Label,
    "q2l.models.Query2Label": Query2Label,
}
MODEL_TARGETS: dict[str, type[nn.Module]] = {
    **HEADS,
    "q2l.models.backbone.TimmBackbone": TimmBackbone,
}

__all__ = ["HEADS", "MODEL_TARGETS", "Query2Label", "TimmBackbone"]
